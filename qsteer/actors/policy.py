"""The policy role: one engine, served to workflows by token ids.

`Policy` holds an engine and counts the calls that cost model time; `PolicyActor` is the same
class building its own engine, which is what a Ray replica (or a test's in-process group) hosts.

Value-guided decoding: heads on the policy's own backbone are loaded here (`load_value_heads`),
so a Q-head's values come from the guided loop's own forward; values in value actors are
attached (`attach_value`: a `ValueFunction`, or Ray handles wrapped in `RemoteValue`). Both
become one `TokenScorer` that `generate_guided` hands down to the engine's guided loop.

The baseline role (Transfer Q*'s aligned model, `baseline=`) is the same class built from the
baseline's path: its `rollouts` continue many contexts at once and return their texts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qsteer.decoding import draft_config
from qsteer.decoding.guided import PolicyHeadScorer, TokenScorer, ValueFunctionScorer, WeightedScorers
from qsteer.engines import Completion, Engine, SamplingParams, build_engine


@dataclass
class Rollout:
    """One continuation of a context: its new tokens, the text of the context from `start` on plus
    those tokens, and their summed log-probability under the model that drew them."""

    token_ids: list[int]
    text: str
    logprob: float
    finish_reason: str


class Policy:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0
        self.draft_actor = None
        self.remote_drafters: dict[tuple, object] = {}  # per draft config: its session's RemoteDrafter (or None)
        self.heads: list[tuple[Any, float]] = []  # (ValueModel on this policy's backbone, weight)
        self.value = None  # a ValueFunction over value actors (or in process), when attached

    def info(self) -> dict[str, Any]:
        stats = getattr(self.engine, "prefix_cache_stats", None)  # the hf engine's, when its cache is on
        return {
            "context_length": self.engine.context_length,
            "path": getattr(self.engine, "path", None),  # the model folder (ctrl_align trains from it)
            "eos_token_ids": self.engine.eos_token_ids,
            "pid": os.getpid(),
            "calls": self.calls,
            **({"prefix_cache": stats()} if stats is not None and stats() is not None else {}),
        }

    def attach_draft(self, draft_actor) -> None:
        """A DraftActor handle for model drafts that are not colocated (draft.colocate=false): generate
        hands a RemoteDrafter over it down to the engine."""
        self.draft_actor = draft_actor
        self.remote_drafters.clear()

    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]:
        return self.engine.encode(prompts, chat=chat)

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        return [self.engine.decode(ids) for ids in token_ids]

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str]
    ) -> list[list[Completion]]:
        self.calls += 1
        drafter = self._remote_drafter(params)
        if drafter is not None:
            return self.engine.generate(prompt_ids, params, keys, drafter=drafter)
        return self.engine.generate(prompt_ids, params, keys)

    def _remote_drafter(self, params: SamplingParams):
        if self.draft_actor is None or not params.speculative:
            return None
        from qsteer.actors.draft import remote_drafter  # Ray, only once a draft actor is attached

        key = draft_config(params.speculative).key()
        if key not in self.remote_drafters:
            self.remote_drafters[key] = remote_drafter(self.draft_actor, params.speculative, self.engine.tokenizer)
        return self.remote_drafters[key]

    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        self.calls += 1
        return self.engine.score(prompt_ids, continuation_ids)

    # -- value-guided decoding -------------------------------------------------------------------
    def load_value_heads(self, terms: list[tuple[str, float]]) -> None:
        """Heads trained on this policy's hidden states ((checkpoint, weight) pairs), on its own model."""
        from qsteer.values import load_value_model

        model = getattr(self.engine, "model", None)
        if model is None or not hasattr(self.engine, "generate_guided"):
            raise ValueError("value.backbone=policy heads ride in the policy's hf engine; use model.engine=hf")
        self.heads = [(load_value_model(path, policy=model), float(weight)) for path, weight in terms]

    def attach_value(self, value: Any) -> None:
        """A `ValueFunction` (in process), or value actors' Ray handles, to steer by beside the heads."""
        from qsteer.values import ValueFunction

        if not isinstance(value, ValueFunction):
            from qsteer.actors.value import RemoteValue

            value = RemoteValue(list(value))
        self.value = value

    def scorer(self) -> TokenScorer:
        """sum of w V over the heads and the attached value, as the guided loop's scorer."""
        from qsteer.values import ValueScorer

        parts: list[tuple[TokenScorer, float]] = []
        for model, weight in self.heads:
            if model.kind == "q":
                parts.append((PolicyHeadScorer(model.head), weight))
            else:  # a scalar head values [s, z] only after a forward over z: k prefixes per row
                parts.append((ValueFunctionScorer(ValueScorer(model, pad_id=self.engine.pad_id)), weight))
        if self.value is not None:
            parts.append((ValueFunctionScorer(self.value), 1.0))
        if not parts:
            raise ValueError("guided decoding needs a value: set value.path (a head on the policy, or a value "
                             "in value actors)")
        return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else WeightedScorers(parts)

    def generate_guided(self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str],
                        alpha: float, scorer: Any = None) -> list[list[Completion]]:
        """`params.n` completions per prompt from p exp(alpha score)/Z over the top `params.top_k`.

        The score is `scorer`'s when given (Transfer Q*, ARGS: `actors.scorers`), else the values this
        policy holds (tokenwise CD). A scorer with `bind` gets this policy first (to decode text, or to
        roll out on this very model); one with `row_stats` adds each row's own costs to its
        completion's `guided` record.
        """
        self.calls += 1
        if scorer is None:
            return self.engine.generate_guided(prompt_ids, params, keys, self.scorer(), alpha)
        if hasattr(scorer, "bind"):
            scorer.bind(self)
        out = self.engine.generate_guided(prompt_ids, params, keys, scorer, alpha)
        if hasattr(scorer, "row_stats"):
            for key, completions in zip(keys, out, strict=True):
                for index, completion in enumerate(completions):
                    completion.guided = {**(completion.guided or {}), **scorer.row_stats(key, index)}
        return out

    def head_values(self, prefixes: list[list[int]]) -> list[float]:
        """sum_i w_i V_i(prefix) over the heads on this policy (blockwise CD's candidate scores)."""
        from qsteer.values import ValueScorer

        self.calls += 1
        total = [0.0] * len(prefixes)
        for model, weight in self.heads:
            values = ValueScorer(model, pad_id=self.engine.pad_id).values(prefixes)
            total = [t + weight * v for t, v in zip(total, values, strict=True)]
        return total

    def rollouts(self, contexts: list[list[int]], starts: list[int], params: SamplingParams,
                 keys: list[str]) -> list[list[Rollout]]:
        """`params.n` continuations of each context, all in one engine call (the engine shares each
        context's prefill among its n rows). A context already ending in EOS is finished: its n
        rollouts are empty. Texts are decoded from `starts[i]` on (the completion so far)."""
        self.calls += 1
        eos = set(self.engine.eos_token_ids)
        live = [i for i, ids in enumerate(contexts) if not (ids and ids[-1] in eos)]
        outs = self.engine.generate([contexts[i] for i in live], params, [keys[i] for i in live]) if live else []
        by_context: dict[int, list[Completion]] = dict(zip(live, outs, strict=True))
        result = []
        for i, context in enumerate(contexts):
            head = context[starts[i]:]
            if i not in by_context:
                result.append([Rollout([], self.engine.decode(head), 0.0, "stop")] * params.n)
                continue
            result.append([Rollout(c.token_ids, self.engine.decode(head + c.token_ids), float(sum(c.logprobs)),
                                   c.finish_reason) for c in by_context[i]])
        return result

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        self.calls += 1
        return self.engine.topk_next(prefixes, k)


class PolicyActor(Policy):
    def __init__(self, engine: str = "hf", num_threads: int | None = None,
                 value_heads: list[tuple[str, float]] | None = None, **engine_kwargs: Any) -> None:
        # Ray pins OMP threads to the actor's num_cpus; an explicit count (or the node's cores
        # shared among its replicas) lets a CPU actor use the whole machine.
        super().__init__(build_engine(engine, num_threads=num_threads, **engine_kwargs))
        if value_heads:
            self.load_value_heads(value_heads)
