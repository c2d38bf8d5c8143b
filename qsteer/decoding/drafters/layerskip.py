"""Layer skipping: the policy itself drafts, with some attention and MLP sub-blocks turned into identities.

A skipped sub-block returns zeros, so the residual add makes it an identity: SWIFT's
`self_draft()`. The first and last layers are never skipped (SWIFT; and transformers reads the
cache length from layer 0). Which sub-blocks: the unified layer-skipping choice spreads whole
layers evenly for a ratio; SWIFT then searches sub-block sets on the fly, scored by
"matchness", the share of positions where the skipped model's argmax equals the full model's.
The drafter drafts on the policy's own cache and crops its columns after each proposal: the
target recomputes the root and verifies the nodes.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Literal

import torch

from qsteer.decoding.drafters.base import Batch, Draft, Drafter, Rows, config_error
from qsteer.decoding.drafters.chains import (
    AcceptancePredictor,
    ChainConfig,
    draft_steps,
    row_generators,
    sample_chains,
    soft_labels,
)
from qsteer.lm.cache import crop
from qsteer.lm.forward import forward_chunk

SubBlock = tuple[str, int]  # ("attn" | "mlp", layer index)


@dataclass(frozen=True)
class LayerSkipConfig(ChainConfig):
    kind: Literal["layerskip"] = "layerskip"
    """Self-speculative drafting: the policy with sub-blocks of its middle layers skipped."""
    skip_ratio: float = 0.45
    """Share of the attention and MLP sub-blocks of layers 1..L-2 skipped (SWIFT's default)."""
    skip: tuple[tuple[str, int], ...] | None = None
    """Explicit [[attn|mlp, layer], ...] to skip; overrides skip_ratio."""
    search: int = 0
    """SWIFT: candidate skip sets tried per call until its stopping rules (0: keep the even set)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.skip_ratio < 1:
            raise config_error("skip_ratio", f"must be in [0, 1), got {self.skip_ratio}")
        if self.search < 0:
            raise config_error("search", f"must be at least 0, got {self.search}")
        if self.skip is not None:
            object.__setattr__(self, "skip", normalise_skip(self.skip))


def normalise_skip(skip) -> tuple[SubBlock, ...]:
    pairs = []
    for item in skip:
        if len(item) != 2 or item[0] not in ("attn", "mlp"):
            raise config_error("skip", f"{list(item)} is not an [attn|mlp, layer] pair")
        pairs.append((str(item[0]), int(item[1])))
    return tuple(pairs)


def check_skip(skip: tuple[SubBlock, ...], num_layers: int) -> None:
    for kind, layer in skip:
        if kind not in ("attn", "mlp") or not 0 < layer < num_layers - 1:
            raise config_error("skip", f"({kind!r}, {layer}) is not attn/mlp of a layer in 1..{num_layers - 2}")


def _zero_attention(*args, **kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return torch.zeros_like(hidden), None


def _zero_mlp(hidden, *args, **kwargs):
    return torch.zeros_like(hidden)


@contextlib.contextmanager
def skipping(model, skip: tuple[SubBlock, ...] | frozenset[SubBlock]):
    """Run `model` with the given sub-blocks skipped; restores it on exit."""
    layers = model.model.layers
    patched = []
    try:
        for kind, index in skip:
            module = layers[index].self_attn if kind == "attn" else layers[index].mlp
            module.forward = _zero_attention if kind == "attn" else _zero_mlp  # instance attribute shadows the class's
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def even_skip(num_layers: int, ratio: float) -> tuple[SubBlock, ...]:
    """Unified layer skipping: skip round(ratio * (L - 2)) whole middle layers, spread evenly."""
    middle = num_layers - 2
    count = round(ratio * middle)
    layers = sorted({min(num_layers - 2, 1 + int((j + 0.5) * middle / count)) for j in range(count)}) if count else []
    return tuple((kind, layer) for layer in layers for kind in ("attn", "mlp"))


def skip_set(model, skip: tuple[SubBlock, ...] | None, skip_ratio: float) -> tuple[SubBlock, ...]:
    """The explicit set, checked against the model, or the even set for the ratio."""
    num_layers = len(model.model.layers)
    chosen = skip if skip is not None else even_skip(num_layers, skip_ratio)
    check_skip(chosen, num_layers)
    return chosen


@torch.inference_mode()
def matchness(model, sequences: list[list[int]], skip, reference: list[torch.Tensor] | None = None) -> float:
    """Share of positions where the skipped model's argmax equals the full model's (SWIFT's score)."""
    agree = total = 0
    for i, seq in enumerate(sequences):
        ids = torch.tensor([seq], device=model.device)
        full = reference[i] if reference is not None else model(input_ids=ids).logits[0].argmax(-1)
        with skipping(model, skip):
            drafted = model(input_ids=ids).logits[0].argmax(-1)
        agree += int((drafted == full).sum())
        total += len(seq)
    return agree / max(total, 1)


class SkipSearch:
    """SWIFT's optimisation phase: random sub-block sets of the same size, kept when they match better.

    SWIFT alternates random draws with Bayesian-optimisation suggestions (bayes_opt, not a
    dependency here) and scores each on the tokens generated so far; this searches on the
    prompts and outputs the drafter has seen, with SWIFT's stopping rules (a target score, a
    patience and an iteration cap). The draft stays lossless whatever set it picks.
    """

    def __init__(self, num_layers: int, start: tuple[SubBlock, ...], max_score: float = 0.95,
                 patience: int = 300, max_iterations: int = 1000, seed: int = 0) -> None:
        self.blocks = [(kind, layer) for layer in range(1, num_layers - 1) for kind in ("attn", "mlp")]
        self.best, self.best_score = start, -1.0
        self.max_score, self.patience, self.max_iterations = max_score, patience, max_iterations
        self.iterations = self.tolerance = 0
        self.rng = random.Random(seed)

    @property
    def done(self) -> bool:
        return (self.best_score > self.max_score or self.tolerance > self.patience
                or self.iterations >= self.max_iterations)

    def step(self, model, sequences: list[list[int]], tries: int) -> tuple[SubBlock, ...]:
        if not sequences:
            return self.best
        reference = [model(input_ids=torch.tensor([s], device=model.device)).logits[0].argmax(-1) for s in sequences]
        if self.best_score < 0:
            self.best_score = matchness(model, sequences, self.best, reference)
        for _ in range(tries):
            if self.done:
                break
            self.iterations += 1
            candidate = tuple(sorted(self.rng.sample(self.blocks, len(self.best))))
            score = matchness(model, sequences, candidate, reference)
            if score > self.best_score:
                self.best, self.best_score, self.tolerance = candidate, score, 0
            else:
                self.tolerance += 1
        return self.best


class LayerSkipDrafter(Drafter):
    """The policy with sub-blocks skipped (SWIFT / unified layer skipping), on the policy's cache."""

    def __init__(self, model, cfg: LayerSkipConfig) -> None:
        self.model, self.cfg = model, cfg
        self.skip = skip_set(model, cfg.skip, cfg.skip_ratio)
        self.search = SkipSearch(len(model.model.layers), self.skip) if cfg.search else None
        self.max_nodes = cfg.gamma * cfg.num_drafts
        self.rule = cfg.rule
        self.predictor = AcceptancePredictor() if cfg.adaptive else None

    @torch.inference_mode()
    def begin(self, batch: Rows) -> None:
        self.rngs = row_generators(batch, "draft")
        self.params = batch.params
        if self.search is not None and not self.search.done:
            contexts = sorted({tuple(h) for h in batch.history})
            self.skip = self.search.step(self.model, [list(c) for c in contexts], self.cfg.search)

    @torch.inference_mode()
    def propose(self, batch: Batch) -> Draft:
        cache, valid = batch.cache, batch.valid
        length = valid.shape[1]
        here = torch.ones((1, 1), dtype=torch.bool)
        with skipping(self.model, self.skip):
            logits = forward_chunk(self.model, cache, valid, batch.last[:, None], batch.pos[:, None], here)
        seen = torch.cat([valid, valid.new_ones((valid.shape[0], 1))], dim=-1)
        step = draft_steps(self.model, cache, seen, batch.pos, self.cfg.num_drafts,
                           lambda: skipping(self.model, self.skip))
        draft = sample_chains(logits[:, -1], step, self.cfg, self.params, self.rngs, self.predictor)
        draft.calls += 1
        crop(cache, length)  # the target recomputes the root and verifies the nodes
        return draft

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        if self.predictor is not None:
            self.predictor.update(*soft_labels(draft, logits, self.params))

    def select(self, keep: torch.Tensor) -> None:
        self.rngs = [self.rngs[i] for i in keep.tolist()]
