"""A bounded cache of the keys and values of token prefixes seen before: a prompt that extends one
costs only its new tokens.

Step-level search (beam search, DVTS, plan search) calls the policy again and again with prompts
that extend earlier ones: the prompt, then the prompt and its first step, and so on. vLLM reuses
such prefixes by hashing blocks of KV (automatic prefix caching); this is the hf engine's
counterpart, keyed by exact token ids instead of blocks. An entry holds one sequence's keys and
values in every layer and serves any context that shares a prefix with it, since the keys and
values at a position depend only on the tokens up to it. `prefill` finds each context's longest
cached prefix (leaving at least one token to run, whose logits the loop needs), writes those
columns into the new cache, runs the model over the rest only, and stores every context's whole
KV for later calls. Identical contexts in one call are computed once. Entries are evicted least
recently used first once their tokens exceed `max_tokens`; an entry that is a prefix of a newly
stored one is dropped, since the new one covers it.

What is stored is each prefilled context (a prompt), not the tokens decoded after it: the next
step's prompt (the previous prompt and its step) then reuses the previous prompt and prefills the
step's tokens, one batched forward over them, instead of the whole prefix.

`prefill` returns `lm.forward.prefill`'s layout (left padded, each context right-aligned), so a
loop cannot tell the two apart. Only the new tokens' keys and values may differ in their last
bits (they attend over cached columns in a chunk rather than in one forward over everything); in
float64 the outputs are the same with and without the cache (tests/test_prefix_cache.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from qsteer.lm import forward
from qsteer.lm.cache import PreallocatedLayer, compact, new_cache


@dataclass
class _Entry:
    ids: np.ndarray
    keys: list[torch.Tensor]  # per layer [heads, length, dim]
    values: list[torch.Tensor]


@dataclass
class PrefixCacheStats:
    """Counts since the cache was made; tokens are counted once per distinct context of a call."""

    lookups: int = 0  # distinct contexts prefilled
    hits: int = 0  # of which some prefix was reused
    reused_tokens: int = 0  # tokens whose keys and values came from the cache
    prefilled_tokens: int = 0  # tokens the model ran over
    deduplicated: int = 0  # contexts that repeated another of the same call (computed once)
    evicted_tokens: int = 0
    stored_tokens: int = 0  # tokens held now
    entries: int = 0  # sequences held now

    def as_dict(self) -> dict:
        total = self.reused_tokens + self.prefilled_tokens
        return {
            "lookups": self.lookups, "hits": self.hits, "misses": self.lookups - self.hits,
            "reused_tokens": self.reused_tokens, "prefilled_tokens": self.prefilled_tokens,
            "token_hit_rate": round(self.reused_tokens / total, 4) if total else 0.0,
            "deduplicated": self.deduplicated, "evicted_tokens": self.evicted_tokens,
            "stored_tokens": self.stored_tokens, "entries": self.entries,
        }


class PrefixCache:
    """Keys and values of at most `max_tokens` tokens of earlier contexts, least recently used out first."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"a prefix cache needs max_tokens >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.stats = PrefixCacheStats()

    # -- lookup and store --------------------------------------------------------------------------
    def longest(self, ids: list[int]) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with `ids`, and that length (at most len(ids) - 1)."""
        query = np.asarray(ids, dtype=np.int64)
        best, best_length = None, 0
        for entry in self.entries.values():
            width = min(len(entry.ids), len(query) - 1)
            if width <= best_length:
                continue
            differ = np.flatnonzero(entry.ids[:width] != query[:width])
            length = int(differ[0]) if len(differ) else width
            if length > best_length:
                best, best_length = entry, length
        if best is not None:
            self.entries.move_to_end(best.ids.tobytes())
        return best, best_length

    def store(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep a context's keys and values (per layer [heads, len(ids), dim]; the caller's copies)."""
        if len(ids) > self.max_tokens:
            return
        query = np.asarray(ids, dtype=np.int64)
        for key, entry in list(self.entries.items()):
            shared = min(len(entry.ids), len(query))
            if not np.array_equal(entry.ids[:shared], query[:shared]):
                continue
            if len(entry.ids) >= len(query):  # an entry already covers this context
                self.entries.move_to_end(key)
                return
            self._drop(key)  # this context covers the entry
        self.entries[query.tobytes()] = _Entry(query, keys, values)
        self.stats.stored_tokens += len(query)
        while self.stats.stored_tokens > self.max_tokens:
            key = next(iter(self.entries))
            self.stats.evicted_tokens += len(self.entries[key].ids)
            self._drop(key)
        self.stats.entries = len(self.entries)

    def _drop(self, key: bytes) -> None:
        self.stats.stored_tokens -= len(self.entries.pop(key).ids)
        self.stats.entries = len(self.entries)

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, model, contexts: list[list[int]], pad_id: int, device: torch.device,
                extra_capacity: int) -> tuple:
        """`lm.forward.prefill` over this cache: the same cache layout, logits, mask and positions."""
        distinct: dict[tuple[int, ...], int] = {}
        for context in contexts:
            distinct.setdefault(tuple(context), len(distinct))
        unique = [list(c) for c in distinct]
        expand = [distinct[tuple(c)] for c in contexts]
        self.stats.deduplicated += len(contexts) - len(unique)
        found = [self.longest(c) for c in unique]
        reuse = [length for _, length in found]
        self.stats.lookups += len(unique)
        self.stats.hits += sum(1 for r in reuse if r)
        self.stats.reused_tokens += sum(reuse)
        self.stats.prefilled_tokens += sum(len(c) - r for c, r in zip(unique, reuse, strict=True))
        probe = new_cache(model, 1)
        if not any(reuse) or not all(isinstance(layer, PreallocatedLayer) for layer in probe.layers):
            cache, logits, mask, positions = forward.prefill(model, unique, pad_id, device, extra_capacity)
        else:
            cache, logits, mask, positions = self._extend(model, unique, found, pad_id, device, extra_capacity)
        if all(isinstance(layer, PreallocatedLayer) for layer in cache.layers):
            width = mask.shape[1]
            for row, context in enumerate(unique):
                kv = [layer.columns(row, width - len(context), width) for layer in cache.layers]
                self.store(context, [k[0].clone() for k, _ in kv], [v[0].clone() for _, v in kv])
        if expand != list(range(len(unique))):
            index = torch.tensor(expand, device=device)
            cache.reorder_cache(index)
            logits, mask, positions = logits[index], mask[index], positions[index]
        return cache, logits, mask, positions

    def _extend(self, model, contexts, found, pad_id, device, extra_capacity) -> tuple:
        """Cached columns right-aligned in [0, C), each context's rest right-aligned in a chunk [C, C + S)
        run in one forward, then the holes squeezed out (prefill's layout)."""
        reuse = [length for _, length in found]
        rest = [len(c) - r for c, r in zip(contexts, reuse, strict=True)]
        cached, chunk, rows = max(reuse), max(rest), len(contexts)
        cache = new_cache(model, cached + chunk + extra_capacity)
        like = next(entry for entry, length in found if length)
        for depth, layer in enumerate(cache.layers):
            layer.allocate(rows, like.keys[depth][None])
            layer.length = cached
            for row, (entry, length) in enumerate(found):
                if length:
                    index = torch.tensor([row], device=device)
                    layer.place(index, entry.keys[depth][None, :, :length], entry.values[depth][None, :, :length],
                                cached - length)
        tokens = torch.full((rows, chunk), pad_id, dtype=torch.long)
        positions = torch.zeros((rows, chunk), dtype=torch.long)
        valid = torch.zeros((rows, cached + chunk), dtype=torch.bool)
        for row, (context, r, s) in enumerate(zip(contexts, reuse, rest, strict=True)):
            tokens[row, chunk - s :] = torch.tensor(context[r:])
            positions[row, chunk - s :] = torch.arange(r, r + s)
            valid[row, cached - r : cached] = True
            valid[row, cached + chunk - s :] = True
        causal = torch.ones((chunk, chunk), dtype=torch.bool).tril()
        mask = valid[:, None, :].expand(rows, chunk, cached + chunk).clone()
        mask[:, :, cached:] &= causal
        # a padding query sees itself: a row with nothing to attend to would be NaN in the cache
        mask[:, :, cached:] |= torch.eye(chunk, dtype=torch.bool)
        out = model(input_ids=tokens.to(device), position_ids=positions.to(device), attention_mask=mask[:, None].to(device),
                    past_key_values=cache, logits_to_keep=1)
        kept = compact(cache, valid.to(device)).long()
        return cache, out.logits[:, -1, :].float(), kept, (kept.cumsum(-1) - 1).clamp(min=0)
