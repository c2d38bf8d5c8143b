"""The draft role in its own actor: a draft LM that keeps per-session KV caches for policy actors.

A policy actor's speculative loop calls it once per round (`RemoteDrafter`), sending the rows'
token histories and getting back the draft tree with its probabilities; the draft's cache stays
in this actor between rounds. Colocating the draft in the policy actor (`draft.colocate=true`)
skips the round trip; this actor lets a bigger draft live on its own device.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import ray
import torch

from qsteer.engines import SamplingParams, build_engine
from qsteer.speculative.config import SpeculativeConfig
from qsteer.speculative.drafters import AcceptancePredictor, ModelDrafter, soft_labels
from qsteer.speculative.state import Draft


def vocab_digest(tokenizer) -> str:
    return hashlib.blake2b(repr(sorted(tokenizer.get_vocab().items())).encode(), digest_size=8).hexdigest()


class DraftActor:
    def __init__(self, engine: str = "hf", num_threads: int | None = None, **engine_kwargs: Any) -> None:
        if engine != "hf":
            raise ValueError(f"draft.engine={engine!r}: draft actors run the hf engine (vLLM drafts go in "
                             "model.engine_kwargs.speculative_config)")
        self.engine = build_engine("hf", num_threads=num_threads, **engine_kwargs)
        self.sessions: dict[str, ModelDrafter] = {}
        self.predictors: dict[tuple, AcceptancePredictor] = {}  # learned across sessions, per draft config
        self.calls = 0

    def info(self) -> dict[str, Any]:
        return {"vocab": vocab_digest(self.engine.tokenizer), "calls": self.calls, "sessions": len(self.sessions)}

    def begin(self, session: str, cfg: dict, history: list[list[int]], keys: list, params: SamplingParams) -> None:
        config = SpeculativeConfig.from_dict(cfg)
        drafter = ModelDrafter(self.engine.model, config, self.engine.pad_id)
        if config.adaptive:
            drafter.predictor = self.predictors.setdefault(config.key(), AcceptancePredictor())
        drafter.begin(SimpleNamespace(history=history, keys=[tuple(k) for k in keys], params=params))
        self.sessions[session] = drafter

    def propose(self, session: str, history: list[list[int]]) -> Draft:
        self.calls += 1
        return self.sessions[session].propose(SimpleNamespace(history=history))

    def learn(self, session: str, q_token: torch.Tensor, soft_label: torch.Tensor) -> None:
        predictor = self.sessions[session].predictor
        if predictor is not None:
            predictor.update(q_token, soft_label)

    def select(self, session: str, keep: torch.Tensor) -> None:
        self.sessions[session].select(keep)

    def end(self, session: str) -> None:
        self.sessions.pop(session, None)


class RemoteDrafter:
    """The drafter protocol over a DraftActor handle (one session per batch of rows)."""

    def __init__(self, actor, cfg: SpeculativeConfig, policy_tokenizer=None) -> None:
        self.actor, self.cfg = actor, cfg
        self.max_nodes = cfg.gamma * cfg.num_drafts
        if policy_tokenizer is not None and ray.get(actor.info.remote())["vocab"] != vocab_digest(policy_tokenizer):
            raise ValueError("draft: the draft actor's tokenizer differs from the policy's; a draft must share it")

    def begin(self, batch) -> None:
        self.session = uuid.uuid4().hex
        self.params = batch.params
        ray.get(self.actor.begin.remote(self.session, asdict(self.cfg), batch.history, batch.keys, batch.params))

    def propose(self, batch) -> Draft:
        return ray.get(self.actor.propose.remote(self.session, batch.history))

    def observe(self, batch, draft: Draft, logits: torch.Tensor) -> None:
        if self.cfg.adaptive:  # actor calls from one caller run in order: no need to wait
            self.actor.learn.remote(self.session, *soft_labels(draft, logits, self.params))

    def select(self, keep: torch.Tensor) -> None:
        self.actor.select.remote(self.session, keep)

    def finish(self) -> None:
        self.actor.end.remote(self.session)
