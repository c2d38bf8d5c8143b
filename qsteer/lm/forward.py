"""How tokens enter the model: left padding, prefill, and the masked forward of a chunk.

Prefill runs each distinct context once, left padded, and copies its cache to every row that
continues it (n samples share a prompt's prefill). A chunk forward appends tokens to a cache
whose rows may hold holes: each new token sees its row's valid columns and, inside the chunk,
what `chunk_visible` allows (causal for a sequence, ancestors for a draft tree).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from qsteer.lm.cache import new_cache


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask and position ids (positions count real tokens only)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def prefill(model, contexts: list[list[int]], pad_id: int, device: torch.device,
            extra_capacity: int) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill each context in one left-padded batch: its cache (room for `extra_capacity` more
    columns), each context's last logits, padding mask and positions."""
    ids, mask, positions = left_pad(contexts, pad_id, device)
    cache = new_cache(model, ids.shape[1] + extra_capacity)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    return cache, out.logits[:, -1, :].float(), mask, positions


def prefill_shared(model, contexts: list[list[int]], slots: list[int], pad_id: int, device: torch.device,
                   extra_capacity: int) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prefill`, then row i of the result continues context `slots[i]`."""
    cache, logits, mask, positions = prefill(model, contexts, pad_id, device, extra_capacity)
    expand = torch.tensor(slots, device=device)
    cache.reorder_cache(expand)
    return cache, logits[expand], mask[expand], positions[expand]


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
