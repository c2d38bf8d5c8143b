"""A draft model: another causal LM with the policy's tokenizer (or the policy's own weights), on its own cache.

Each round the drafter first feeds every row the tokens it has not seen yet (the tokens the
target accepted and emitted last round), then samples its chains (`chains.sample_chains`), and
crops the chains' columns again: their accepted tokens come back as pending tokens next round.
The drafter runs in the policy's process (`colocate: true`) or in a draft actor, whose
`RemoteDrafter` hands the same protocol to the loop (`qsteer.actors.draft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qsteer.decoding.drafters.base import Batch, Draft, Drafter, Rows
from qsteer.decoding.drafters.chains import (
    AcceptancePredictor,
    ChainConfig,
    draft_steps,
    row_generators,
    sample_chains,
    soft_labels,
)
from qsteer.lm.cache import compact, crop
from qsteer.lm.forward import forward_chunk, prefill_shared


@dataclass(frozen=True)
class ModelDraftConfig(ChainConfig):
    kind: Literal["model"] = "model"
    """Another causal LM with the policy's tokenizer drafts; the policy verifies."""
    gamma: int = 5
    """Draft tokens per round (the most, when adaptive)."""
    path: str | None = None
    """The draft LM: a folder or hub id; null drafts with the policy's own weights (every draft is accepted)."""
    colocate: bool = True
    """true: loaded inside each policy actor; false: its own actor group (the `draft` role, `draft.actor`)."""


class ModelDrafter(Drafter):
    """Another causal LM (or the policy's own weights) drafting on its own cache."""

    def __init__(self, model, cfg: ChainConfig, pad_id: int, capacity_slack: int = 64) -> None:
        self.model, self.cfg, self.pad_id = model, cfg, pad_id
        self.max_nodes = cfg.gamma * cfg.num_drafts
        self.rule = cfg.rule
        self.slack = capacity_slack
        self.predictor = AcceptancePredictor() if cfg.adaptive else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def begin(self, batch: Rows) -> None:
        self.rngs = row_generators(batch, "draft")
        self.params = batch.params
        contexts = [tuple(h[:-1]) for h in batch.history]
        unique = list(dict.fromkeys(contexts))
        slot = {c: i for i, c in enumerate(unique)}
        headroom = batch.params.max_new_tokens + 2 * (self.max_nodes + 1) + self.slack
        self.cache, _, mask, _ = prefill_shared(self.model, [list(c) for c in unique], [slot[c] for c in contexts],
                                                self.pad_id, self.device, headroom)
        self.capacity = mask.shape[1] + headroom
        self.valid = mask.bool()
        self.consumed = [len(h) - 1 for h in batch.history]

    @torch.inference_mode()
    def propose(self, batch: Rows) -> Draft:
        """Feed each row's tokens the draft has not seen yet, then sample the chains."""
        pending = [h[c:] for h, c in zip(batch.history, self.consumed, strict=True)]
        rows, width = len(pending), max(len(p) for p in pending)
        if self.valid.shape[1] + width + self.max_nodes > self.capacity:
            self.valid = compact(self.cache, self.valid)
        tokens = torch.full((rows, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        real = torch.zeros((rows, width), dtype=torch.bool)
        for r, (todo, done) in enumerate(zip(pending, self.consumed, strict=True)):
            tokens[r, width - len(todo):] = torch.tensor(todo)
            positions[r, width - len(todo):] = torch.arange(done, done + len(todo))
            real[r, width - len(todo):] = True
        # real pending tokens see each other causally; a padding column sees only itself
        visible = torch.tril(torch.ones((width, width), dtype=torch.bool))[None] & real[:, None, :]
        visible |= torch.eye(width, dtype=torch.bool)[None]
        logits = forward_chunk(self.model, self.cache, self.valid, tokens.to(self.device),
                               positions.to(self.device), visible, logits_to_keep=1)
        self.valid = torch.cat([self.valid, real.to(self.device)], dim=-1)
        self.consumed = [c + len(p) for c, p in zip(self.consumed, pending, strict=True)]
        base = self.valid.shape[1]
        step = draft_steps(self.model, self.cache, self.valid, positions[:, -1].to(self.device), self.cfg.num_drafts)
        draft = sample_chains(logits[:, -1], step, self.cfg, self.params, self.rngs, self.predictor)
        draft.calls += 1
        crop(self.cache, base)  # the chains' columns: their accepted tokens come back as pending
        return draft

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        if self.predictor is not None:
            self.predictor.update(*soft_labels(draft, logits, self.params))

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep.to(self.device))
        self.valid = self.valid[keep.to(self.device)]
        self.consumed = [self.consumed[i] for i in keep.tolist()]
        self.rngs = [self.rngs[i] for i in keep.tolist()]
