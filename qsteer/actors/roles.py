"""The role interfaces workflows program against, and the typed groups that serve them.

A workflow calls `ctx.policy.generate(prompt_ids, params, keys)` and gets completions back; it
never sees Ray. `PolicyGroup` and `RewardGroup` give those typed methods over any set of
`Replicas`: Ray actors (`group.ActorGroup`) or the same role objects held in this process
(`local.LocalReplicas`). Both send each call to the least-busy replica, and the role objects
count their own calls, so a workflow's counts are the same on either, and tests run every
workflow without Ray.
"""

from __future__ import annotations

from typing import Any, Protocol

from qsteer.engines import Completion, SamplingParams

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

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str]
    ) -> list[list[Completion]]: ...

    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]: ...

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]: ...


class RewardRole(Protocol):
    """What workflows ask of the reward: (reward, info) per completion, TRL's arguments in."""

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None,
        columns: dict[str, list[Any]],
    ) -> list[Scored]: ...


class _Group:
    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas

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
        return self.replicas.run("encode", prompts, chat)

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str]
    ) -> list[list[Completion]]:
        return self.replicas.run("generate", prompt_ids, params, keys)

    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        return self.replicas.run("score", prompt_ids, continuation_ids)

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        return self.replicas.run("topk_next", prefixes, k)


class RewardGroup(_Group):
    """The reward role (RewardRole) over replicas of `actors.reward.Reward`."""

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None,
        columns: dict[str, list[Any]],
    ) -> list[Scored]:
        return self.replicas.run("score", prompts, completions, completion_ids, columns)
