"""The draft role in its own actor: a draft LM that keeps per-session KV caches for policy actors.

A policy actor's speculative loop calls it once per round through `RemoteDrafter`, which meets
the loop's `Drafter` protocol (`qsteer.decoding.drafters.base`): it sends the rows' token
histories and gets back the draft tree with its probabilities, while the draft's cache stays in
this actor between rounds. The policy actor builds the `RemoteDrafter` and hands it down to its
engine (`engine.generate(..., drafter=...)`): the engine and the loop never see Ray.
Colocating the draft in the policy actor (`draft.colocate=true`) skips the round trip; this
actor lets a bigger draft live on its own device.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import ray
import torch

from qsteer.decoding import draft_config
from qsteer.decoding.drafters.base import Batch, Draft, Drafter, Rows
from qsteer.decoding.drafters.chains import AcceptancePredictor, ChainConfig, soft_labels
from qsteer.decoding.drafters.model import ModelDraftConfig, ModelDrafter
from qsteer.engines import SamplingParams, build_engine


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

    def begin(self, session: str, cfg: ChainConfig, rows: Rows) -> None:
        drafter = ModelDrafter(self.engine.model, cfg, self.engine.pad_id)
        if cfg.adaptive:
            drafter.predictor = self.predictors.setdefault(cfg.key(), AcceptancePredictor())
        drafter.begin(rows)
        self.sessions[session] = drafter

    def propose(self, session: str, rows: Rows) -> Draft:
        self.calls += 1
        return self.sessions[session].propose(rows)

    def learn(self, session: str, q_token: torch.Tensor, soft_label: torch.Tensor) -> None:
        predictor = self.sessions[session].predictor
        if predictor is not None:
            predictor.update(q_token, soft_label)

    def select(self, session: str, keep: torch.Tensor) -> None:
        self.sessions[session].select(keep)

    def end(self, session: str) -> None:
        self.sessions.pop(session, None)


class RemoteDrafter(Drafter):
    """The `Drafter` protocol over a DraftActor handle (one session per batch of rows)."""

    def __init__(self, actor, cfg: ModelDraftConfig, policy_tokenizer=None) -> None:
        self.actor, self.cfg = actor, cfg
        self.max_nodes = cfg.gamma * cfg.num_drafts
        self.rule = cfg.rule
        if policy_tokenizer is not None and ray.get(actor.info.remote())["vocab"] != vocab_digest(policy_tokenizer):
            raise ValueError("draft: the draft actor's tokenizer differs from the policy's; a draft must share it")

    def begin(self, batch: Rows) -> None:
        self.session = uuid.uuid4().hex
        self.params: SamplingParams = batch.params
        ray.get(self.actor.begin.remote(self.session, self.cfg, self._rows(batch)))

    def propose(self, batch: Batch) -> Draft:
        return ray.get(self.actor.propose.remote(self.session, self._rows(batch)))

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        if self.cfg.adaptive:  # actor calls from one caller run in order: no need to wait
            self.actor.learn.remote(self.session, *soft_labels(draft, logits, self.params))

    def select(self, keep: torch.Tensor) -> None:
        self.actor.select.remote(self.session, keep)

    def finish(self) -> None:
        self.actor.end.remote(self.session)

    @staticmethod
    def _rows(batch: Rows) -> Rows:
        """Only what the draft model needs crosses to the actor: never the target's cache."""
        return Rows(batch.history, batch.keys, batch.params)


def remote_drafter(actor, speculative: dict | None, policy_tokenizer) -> RemoteDrafter | None:
    """A RemoteDrafter when `speculative` asks for a model draft outside the policy actor (colocate false)."""
    if actor is None or not speculative:
        return None
    cfg = draft_config(speculative)
    if not isinstance(cfg, ModelDraftConfig) or cfg.colocate:
        return None
    return RemoteDrafter(actor, cfg, policy_tokenizer)
