"""The role interfaces workflows program against, and the typed groups that serve them.

A workflow calls `ctx.policy.generate(prompt_ids, params, keys)` and gets completions back; it
never sees Ray. `PolicyGroup` and `RewardGroup` give those typed methods over any set of
`Replicas`: Ray actors (`group.ActorGroup`) or the same role objects held in this process
(`local.LocalReplicas`). Both send each call to the least-busy replica, and the role objects
count their own calls, so a workflow's counts are the same on either, and tests run every
workflow without Ray.

Each group also counts, for the run's live view (`qsteer/progress.py`), the calls made through
it from this process, those that raised, and the tokens in the completions they returned
(`RoleCounts`). These are the driver's calls: a call one actor makes to another role from
inside its own process (Transfer Q*'s baseline rollouts from the policy actor) is counted there,
not here.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from qsteer.actors.policy import Rollout
from qsteer.engines import Completion, SamplingParams

if TYPE_CHECKING:
    from qsteer.actors.sandbox import Job, Verdict

Scored = tuple[float | None, dict]  # one item's reward (None when it failed) and its info


class Replicas(Protocol):
    """Replicas of one role object (`Policy`, `Reward`), in Ray actors or in this process."""

    def run(self, method: str, *args: Any) -> Any:
        """Call `method` on the replica with the fewest calls running, and return its result."""
        ...

    def run_all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every replica; results in replica order."""
        ...

    def __len__(self) -> int: ...

    def shutdown(self) -> None: ...


class PolicyRole(Protocol):
    """What workflows ask of the policy: the engine protocol, served by token ids."""

    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]: ...

    def decode(self, token_ids: list[list[int]]) -> list[str]: ...

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str]
    ) -> list[list[Completion]]: ...

    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]: ...

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]: ...

    def generate_guided(self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str],
                        alpha: float, scorer: Any = None) -> list[list[Completion]]:
        """Token-wise guided decoding: by `scorer` (a `decoding.guided.TokenScorer`: Transfer Q*, ARGS)
        when given, else by the values the policy holds or is attached to (tokenwise CD)."""
        ...

    def head_values(self, prefixes: list[list[int]]) -> list[float]:
        """sum w V(prefix) over the value heads riding on the policy's backbone."""
        ...

    def rollouts(self, contexts: list[list[int]], starts: list[int], params: SamplingParams,
                 keys: list[str]) -> list[list[Rollout]]:
        """`params.n` continuations of every context in one call, with their texts (the baseline role)."""
        ...


class SandboxRole(Protocol):
    """What workflows ask of the sandbox: one verdict per job, faults apart from failures."""

    def run(self, jobs: list[Job]) -> list[Verdict]: ...


class RewardRole(Protocol):
    """What workflows ask of the reward: (reward, info) per completion, TRL's arguments in."""

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None,
        columns: dict[str, list[Any]],
    ) -> list[Scored]: ...


class ValueRole(Protocol):
    """What workflows (and guided loops) ask of a value: `qsteer.values.ValueFunction` over token ids."""

    def values(self, prefixes: list[list[int]]) -> list[float]: ...

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]: ...


# The role methods whose results are completions (or rollouts): their tokens were generated.
GENERATING = frozenset({"generate", "generate_guided", "rollouts"})


class RoleCounts:
    """Calls made through one role group, the calls among them that raised, and tokens generated.

    Thread-safe: the run's batch threads call through the same group at once. A copy that crosses
    into another actor (a group handed to a Transfer Q* scorer) starts at zero there.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.tokens = 0
        self._lock = threading.Lock()

    def add(self, calls: int = 0, errors: int = 0, tokens: int = 0) -> None:
        with self._lock:
            self.calls += calls
            self.errors += errors
            self.tokens += tokens

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"calls": self.calls, "errors": self.errors, "tokens": self.tokens}

    def __getstate__(self) -> dict[str, int]:
        return {"calls": 0, "errors": 0, "tokens": 0}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def generated_tokens(out: list[list[Any]]) -> int:
    """Tokens in a generating call's result: per prompt, its completions (or rollouts)."""
    return sum(len(item.token_ids) for row in out for item in row)


class _Group:
    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.counts = RoleCounts()

    def _run(self, method: str, *args: Any) -> Any:
        """`replicas.run`, counted: a call is counted when made, an error when it raises."""
        self.counts.add(calls=1)
        try:
            out = self.replicas.run(method, *args)
        except BaseException:
            self.counts.add(errors=1)
            raise
        if method in GENERATING:
            self.counts.add(tokens=generated_tokens(out))
        return out

    def __len__(self) -> int:
        return len(self.replicas)

    def info(self) -> list[dict[str, Any]]:
        """Each replica's `info()`: its call count, pid, and the role's own facts."""
        return self.replicas.run_all("info")

    def shutdown(self) -> None:
        self.replicas.shutdown()


class PolicyGroup(_Group):
    """The policy role (PolicyRole) over replicas of `actors.policy.Policy`."""

    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]:
        return self._run("encode", prompts, chat)

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        return self._run("decode", token_ids)

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str]
    ) -> list[list[Completion]]:
        return self._run("generate", prompt_ids, params, keys)

    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        return self._run("score", prompt_ids, continuation_ids)

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        return self._run("topk_next", prefixes, k)

    def generate_guided(self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str],
                        alpha: float, scorer: Any = None) -> list[list[Completion]]:
        return self._run("generate_guided", prompt_ids, params, keys, alpha, scorer)

    def rollouts(self, contexts: list[list[int]], starts: list[int], params: SamplingParams,
                 keys: list[str]) -> list[list[Rollout]]:
        """`params.n` continuations of every context in one call, with their texts (the baseline role)."""
        return self._run("rollouts", contexts, starts, params, keys)

    def head_values(self, prefixes: list[list[int]]) -> list[float]:
        return self._run("head_values", prefixes)


class ValueGroup(_Group):
    """The value role (ValueRole) over replicas of `actors.value.Value`: itself a ValueFunction."""

    def values(self, prefixes: list[list[int]]) -> list[float]:
        return self._run("values", prefixes)

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        return self._run("next_values", prefixes, candidates)


class TrainerGroup(_Group):
    """The value trainer (`actors.value.ValueTrainer`): fits a value on given samples."""

    def fit(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], rewards: list[float],
            heldout: list[bool], end_ids: list[int]) -> dict[str, Any]:
        return self._run("fit", prompt_ids, completion_ids, rewards, heldout, end_ids)


class ValueSum:
    """The value role as workflows see it: heads riding on the policy plus value actors, summed.

    Either part may be absent. `next_values` needs no policy heads (tokenwise decoding with heads
    runs inside the policy actors, `PolicyGroup.generate_guided`).
    """

    def __init__(self, policy: PolicyGroup | None = None, group: ValueGroup | None = None) -> None:
        if policy is None and group is None:
            raise ValueError("ValueSum needs heads on the policy or a value group")
        self.policy, self.group = policy, group

    def values(self, prefixes: list[list[int]]) -> list[float]:
        parts = []
        if self.policy is not None:
            parts.append(self.policy.head_values(prefixes))
        if self.group is not None:
            parts.append(self.group.values(prefixes))
        return [sum(p) for p in zip(*parts, strict=True)]

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        if self.policy is not None or self.group is None:
            raise ValueError("heads on the policy score next tokens inside the policy (generate_guided)")
        return self.group.next_values(prefixes, candidates)

    def info(self) -> list[dict[str, Any]]:
        return self.group.info() if self.group is not None else []

    @property
    def counts(self) -> RoleCounts | None:
        """The value actors' counts; the heads' calls are the policy's."""
        return self.group.counts if self.group is not None else None

    def shutdown(self) -> None:
        if self.group is not None:  # the policy group is shut down as the policy role
            self.group.shutdown()


# The baseline role (Transfer Q*'s aligned model) is a policy built from another path.
BaselineGroup = PolicyGroup


class RewardGroup(_Group):
    """The reward role (RewardRole) over replicas of `actors.reward.Reward`."""

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None,
        columns: dict[str, list[Any]],
    ) -> list[Scored]:
        return self._run("score", prompts, completions, completion_ids, columns)


_CACHED_FAULTS = (None, "timeout", "oom")


class SandboxGroup(_Group):
    """The sandbox role (SandboxRole) over replicas of `actors.sandbox.Sandbox`, with the results cache.

    A call's distinct uncached jobs are split into one chunk per replica and sent at once, so
    every replica works; verdicts are cached by the job's hash (code, test, entry point), so a
    candidate met again (the same code from two plans, a PG-TD rollout reached twice) costs
    nothing. A timeout or memory fault is the program's own under the same limits and is cached;
    a kill, a judge error or an unavailable sandbox may be the machine's, and is not.
    """

    def __init__(self, replicas: Replicas, cache_size: int = 100_000) -> None:
        super().__init__(replicas)
        self.cache_size = cache_size
        self.cache: dict[str, Verdict] = {}
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def run(self, jobs: list[Job]) -> list[Verdict]:
        keys = [job.key() for job in jobs]
        with self._lock:
            todo = {key: job for key, job in zip(keys, jobs, strict=True) if key not in self.cache}
            self.hits += len(jobs) - len(todo)
            self.misses += len(todo)
        found: dict[str, Verdict] = {}
        if todo:
            items = list(todo.items())
            lanes = max(1, min(len(self.replicas), len(items)))
            chunks = [items[i::lanes] for i in range(lanes)]
            with ThreadPoolExecutor(max_workers=lanes) as pool:
                done = list(pool.map(lambda chunk: self._run("run", [job for _, job in chunk]), chunks))
            for chunk, verdicts in zip(chunks, done, strict=True):
                for (key, _), verdict in zip(chunk, verdicts, strict=True):
                    found[key] = verdict
            with self._lock:
                for key, verdict in found.items():
                    if verdict.fault in _CACHED_FAULTS and len(self.cache) < self.cache_size:
                        self.cache[key] = verdict
        with self._lock:
            return [found[key] if key in found else self.cache[key] for key in keys]


class BaselineTrainerGroup(_Group):
    """The baseline trainer (`actors.baseline_trainer.BaselineTrainer`): DPO, then samples from the result."""

    def align_dpo(self, pairs: list, out_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
        return self._run("align_dpo", pairs, out_dir, settings)

    def generate(self, model_dir: str, prompt_ids: list[list[int]], params: SamplingParams,
                 keys: list[str]) -> list[list[Completion]]:
        return self._run("generate", model_dir, prompt_ids, params, keys)

    def write_card(self, out_dir: str, card: dict[str, Any]) -> None:
        self._run("write_card", out_dir, card)
