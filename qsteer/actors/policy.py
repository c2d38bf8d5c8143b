"""The policy role: one engine, served to workflows by token ids.

`Policy` holds an engine and counts the calls that cost model time; `PolicyActor` is the same
class building its own engine, which is what a Ray replica (or a test's in-process group) hosts.
"""

from __future__ import annotations

import os
from typing import Any

from qsteer.decoding import draft_config
from qsteer.engines import Completion, Engine, SamplingParams, build_engine


class Policy:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0
        self.draft_actor = None
        self.remote_drafters: dict[tuple, object] = {}  # per draft config: its session's RemoteDrafter (or None)

    def info(self) -> dict[str, Any]:
        return {
            "context_length": self.engine.context_length,
            "eos_token_ids": self.engine.eos_token_ids,
            "pid": os.getpid(),
            "calls": self.calls,
        }

    def attach_draft(self, draft_actor) -> None:
        """A DraftActor handle for model drafts that are not colocated (draft.colocate=false): generate
        hands a RemoteDrafter over it down to the engine."""
        self.draft_actor = draft_actor
        self.remote_drafters.clear()

    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]:
        return self.engine.encode(prompts, chat=chat)

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

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        self.calls += 1
        return self.engine.topk_next(prefixes, k)


class PolicyActor(Policy):
    def __init__(self, engine: str = "hf", num_threads: int | None = None, **engine_kwargs: Any) -> None:
        # Ray pins OMP threads to the actor's num_cpus; an explicit count (or the node's cores
        # shared among its replicas) lets a CPU actor use the whole machine.
        super().__init__(build_engine(engine, num_threads=num_threads, **engine_kwargs))
