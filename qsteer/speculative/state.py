"""What a speculative round passes around: the batch's rows, a draft tree, and the masked forward.

Rows of a batch accept different numbers of tokens each round. Rather than giving each row its
own cache, every round appends the same number of columns to one cache and marks per row which
columns hold accepted tokens (`valid`); rejected columns stay behind as holes that nothing
attends to, and `compact` squeezes them out when the cache fills. Positions are explicit, so a
hole never shifts a token's rotary position. Tree drafts use the same mechanism: a node sees the
row's valid columns, its ancestors and itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qsteer.engines.base import SamplingParams
from qsteer.engines.hf import PreallocatedLayer, filter_logits


@dataclass
class Draft:
    tokens: torch.Tensor  # [rows, nodes] draft tokens
    parents: list[int]  # [nodes] the tree's shape, shared by all rows; -1 is the root (the last emitted token)
    valid: torch.Tensor  # [rows, nodes] a row may use fewer nodes (no lookup match, adaptive stop)
    q: torch.Tensor | None = None  # [rows, nodes, vocab] the processed draft distribution each node was drawn from
    without_replacement: bool = False  # siblings drawn without replacement (RSD), else i.i.d. or deterministic
    calls: int = 0  # draft forward passes spent on this round
    root: torch.Tensor | None = None  # [rows] the last emitted token the tree hangs from (set by the loop)

    @property
    def depths(self) -> list[int]:
        depth: list[int] = []
        for parent in self.parents:
            depth.append(0 if parent < 0 else depth[parent] + 1)
        return depth


@dataclass
class Batch:
    history: list[list[int]]  # per row: prompt + emitted tokens; the last one is not yet in the target cache
    keys: list[tuple[str, int]]  # (prompt key, sample index) per row: names its random streams
    cache: object  # the target's DynamicCache of PreallocatedLayers
    valid: torch.Tensor  # [rows, cache length] bool
    pos: torch.Tensor  # [rows] position id of each row's last token
    params: SamplingParams

    @property
    def last(self) -> torch.Tensor:
        return torch.tensor([h[-1] for h in self.history], device=self.pos.device)


def ancestors(parents: list[int]) -> torch.Tensor:
    """[1 + nodes, 1 + nodes] visibility inside a verify chunk: column 0 is the root, node i is i + 1."""
    size = len(parents) + 1
    seen = torch.zeros((size, size), dtype=torch.bool)
    seen[0, 0] = True
    for node, parent in enumerate(parents):
        seen[node + 1] = seen[parent + 1]
        seen[node + 1, node + 1] = True
    return seen


def forward_chunk(model, cache, valid: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                  chunk_visible: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
    """Append `tokens` [rows, width] to the cache; each sees the row's valid columns and `chunk_visible`.

    `valid` is [rows, cache length], or [rows, width, cache length] when each new token sees its own set.
    """
    rows, width = tokens.shape
    prefix = valid if valid.dim() == 3 else valid[:, None, :].expand(rows, width, valid.shape[1])
    mask = torch.cat([prefix, chunk_visible.to(valid.device).expand(rows, width, width)], dim=-1)[:, None]
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=cache,
                logits_to_keep=logits_to_keep)
    return out.logits.float()


def crop(cache, length: int) -> None:
    for layer in cache.layers:
        layer.crop(length)


def compact(cache, valid: torch.Tensor) -> torch.Tensor:
    """Squeeze out the holes: keep each row's valid columns, left-padded to a common width."""
    counts = valid.sum(-1)
    width = int(counts.max())
    index = torch.zeros((valid.shape[0], width), dtype=torch.long, device=valid.device)
    new_valid = torch.zeros((valid.shape[0], width), dtype=torch.bool, device=valid.device)
    for row in range(valid.shape[0]):
        kept = valid[row].nonzero()[:, 0]
        index[row, width - len(kept):] = kept
        new_valid[row, width - len(kept):] = True
    for layer in cache.layers:
        if not isinstance(layer, PreallocatedLayer):
            raise TypeError("speculative decoding needs the engine's preallocated KV cache layers")
        layer.keep_positions(index)
    return new_valid


def processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling uses (temperature, top-k, top-p), for target and draft alike."""
    flat = logits.reshape(-1, logits.shape[-1])
    if params.temperature == 0:  # greedy drafts and checks use the raw distribution
        return flat.softmax(-1).reshape(logits.shape)
    return filter_logits(flat, params).softmax(-1).reshape(logits.shape)


def uniform_from(generator: torch.Generator):
    return lambda: float(torch.rand((), generator=generator, dtype=torch.float64))
