"""The KV cache every loop writes: one preallocated buffer per layer, rows that may hold holes.

DynamicLayer concatenates at every step, copying the whole cache each time: a quarter of CPU
decode time at 128 rows. Here a step writes one column in place (gpt-fast's KV cache). All rows
share the column count; a row marks which columns it attends to in its own mask, so columns it
does not use (left padding, rejected drafts, the previous occupant of a reused row) are holes.
Positions are passed explicitly, so a hole never shifts a token's rotary position. `compact`
squeezes the holes out when the buffer fills.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer sized for the whole generation."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.allocate(key_states.shape[0], key_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions cannot take position {end}")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        return self._views()

    def allocate(self, rows: int, like: torch.Tensor) -> None:
        """Zeroed buffers for `rows` rows shaped after `like` [*, heads, *, head_dim]: a hole must hold
        finite numbers, since a masked column still meets a zero attention weight (0 * nan is nan)."""
        self.lazy_initialization(like, like)
        shape = (rows, like.shape[1], self.capacity, like.shape[-1])
        self._keys, self._values = like.new_zeros(shape), like.new_zeros(shape)

    def columns(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `row`'s keys and values at columns start..end, [1, heads, end - start, dim]."""
        return self._keys[row : row + 1, :, start:end], self._values[row : row + 1, :, start:end]

    def _views(self):
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        if max_length < self.length:
            self.length = max(max_length, 0)
            self._views()

    def keep_positions(self, index: torch.Tensor) -> None:
        """Per row, keep only the cache positions in `index` [rows, width] (speculative rollback)."""
        if not self.length:
            return
        gather = index[:, None, :, None].expand(-1, self._keys.shape[1], -1, self._keys.shape[-1])
        width = index.shape[1]
        self._keys[:, :, :width] = self._keys[:, :, : self.length].gather(2, gather)
        self._values[:, :, :width] = self._values[:, :, : self.length].gather(2, gather)
        self.length = width
        self._views()

    def place(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Write `keys`/`values` [len(rows), heads, width, dim] into `rows` at columns start.. (a freshly
        prefilled sequence taking over a row of a running batch)."""
        end = start + keys.shape[2]
        self._keys[rows, :, start:end] = keys
        self._values[rows, :, start:end] = values

    def shift(self, columns: int) -> None:
        """Move every row's columns `columns` to the right (room for a prompt longer than the cache)."""
        if self.length + columns > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions cannot shift {self.length} by {columns}")
        for buffer in (self._keys, self._values):
            buffer[:, :, columns : columns + self.length] = buffer[:, :, : self.length].clone()
            buffer[:, :, :columns] = 0
        self.length += columns
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self._keys, self._values = self._keys[beam_idx], self._values[beam_idx]
            self._views()

    batch_select_indices = reorder_cache


def new_cache(model, capacity: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    # only plain full-attention layers are swapped; sliding-window layers keep their own logic
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def preallocated(cache) -> list[PreallocatedLayer]:
    """The cache's layers, refusing a cache a loop cannot write holes into."""
    for layer in cache.layers:
        if not isinstance(layer, PreallocatedLayer):
            raise TypeError("this loop needs the preallocated KV cache (qsteer.lm.cache.new_cache)")
    return cache.layers


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
    for layer in preallocated(cache):
        layer.keep_positions(index)
    return new_valid
