"""Layer skipping: the policy itself, with some attention and MLP sub-blocks turned into identities.

A skipped sub-block returns zeros, so the residual add makes it an identity: SWIFT's
`self_draft()`. The first and last layers are never skipped (SWIFT; and transformers reads the
cache length from layer 0). Which sub-blocks: the unified layer-skipping choice spreads whole
layers evenly for a ratio; SWIFT then searches sub-block sets on the fly, scored by
"matchness", the share of positions where the skipped model's argmax equals the full model's.
"""

from __future__ import annotations

import contextlib
import random

import torch

SubBlock = tuple[str, int]  # ("attn" | "mlp", layer index)


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
