"""The hf engine's prefix cache (`lm/prefix_cache.py`): the same outputs with and without it, the
counters it keeps, its bound, and least-recently-used eviction. Tiny model in float64, where the
outputs are bitwise independent of how a context's keys and values were computed."""

from __future__ import annotations

import pytest
import torch

from qsteer.engines.base import SamplingParams
from qsteer.lm.prefix_cache import PrefixCache

PROMPTS = ["Write one sentence about the sea.", "Continue this review: The hotel was", "What is 2+2?"]


@pytest.fixture(scope="module")
def engines(tiny_path):
    """Two float64 engines on the tiny model: one without a prefix cache, one with."""
    from qsteer.engines.hf import HFEngine

    return (HFEngine(path=tiny_path, dtype="float64", max_batch_rows=64),
            HFEngine(path=tiny_path, dtype="float64", max_batch_rows=64, prefix_cache_tokens=4096))


def _grow(engine, prompts: list[list[int]], params: SamplingParams, rounds: int) -> list[list[list[int]]]:
    """Rounds of a step-level search's calls: each prompt grows by its first sample's tokens,
    plus a fresh prompt that shares only the chat template's header with the others."""
    seen = []
    for round_ in range(rounds):
        keys = [f"p{i}" for i in range(len(prompts))]
        out = engine.generate(prompts, params, keys)
        seen.append([[c.token_ids for c in comps] for comps in out])
        seen.append([[c.logprobs for c in comps] for comps in out])
        prompts = [p + comps[0].token_ids for p, comps in zip(prompts, out, strict=True)]
        prompts.append(engine.encode([f"A new question, round {round_}."])[0])
    return seen


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_equal_with_and_without_the_cache(engines, temperature):
    plain_engine, cached = engines
    prompts = plain_engine.encode(PROMPTS)
    params = SamplingParams(n=2, max_new_tokens=8, temperature=temperature, seed=7, stop=["\n\n"])
    before = cached.prefix_cache_stats()
    assert _grow(plain_engine, prompts, params, 2) == _grow(cached, prompts, params, 2)
    after = cached.prefix_cache_stats()
    # round 2 extends every earlier prompt: each of those prefills reuses it
    assert after["hits"] - before["hits"] >= len(PROMPTS)
    assert after["reused_tokens"] > before["reused_tokens"]


def test_continuous_batching_with_the_cache(engines):
    """More rows than slots: admitted prompts are prefilled through the cache too, with the same tokens."""
    from qsteer.engines.hf import HFEngine

    plain_engine, cached = engines
    small = HFEngine(path=plain_engine.path, dtype="float64", max_batch_rows=4, prefix_cache_tokens=4096)
    small.model, small.lm = plain_engine.model, plain_engine.lm  # the same weights, one load
    prompts = plain_engine.encode(PROMPTS)
    params = SamplingParams(n=3, max_new_tokens=6, seed=3)
    first = plain_engine.generate(prompts, params)
    prompts2 = [p + comps[1].token_ids for p, comps in zip(prompts, first, strict=True)]
    small.generate(prompts, params)
    ours = small.generate(prompts2, params)
    assert [[c.token_ids for c in comps] for comps in ours] == \
        [[c.token_ids for c in comps] for comps in plain_engine.generate(prompts2, params)]
    assert small.prefix_cache_stats()["hits"] >= len(PROMPTS)


def test_prefill_reuses_only_the_new_tokens_and_counts_them(engines):
    plain_engine, _ = engines
    lm = plain_engine.lm
    cache = PrefixCache(10_000)
    base = plain_engine.encode(PROMPTS[:1])[0]
    longer = base + [300, 301, 302, 303]
    cache.prefill(lm.model, [base], lm.pad_id, lm.device, 4)
    stats = cache.stats.as_dict()
    assert (stats["hits"], stats["prefilled_tokens"], stats["entries"]) == (0, len(base), 1)
    _, logits, mask, positions = cache.prefill(lm.model, [longer, longer, base], lm.pad_id, lm.device, 4)
    stats = cache.stats.as_dict()
    # `longer` reuses all of `base` and runs its 4 new tokens, once for its two copies; `base` itself
    # reruns only its last token (its logits are needed); `longer` then replaces `base` as an entry
    assert stats["deduplicated"] == 1
    assert stats["reused_tokens"] == len(base) + len(base) - 1
    assert stats["prefilled_tokens"] == len(base) + 4 + 1
    assert (stats["entries"], stats["stored_tokens"]) == (1, len(longer))
    _, ref_logits, ref_mask, ref_positions = _reference(lm, [longer, longer, base])
    assert torch.equal(mask, ref_mask) and torch.equal(positions, ref_positions)
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-12)


def _reference(lm, contexts):
    from qsteer.lm.forward import prefill

    return prefill(lm.model, contexts, lm.pad_id, lm.device, 4)


def test_bounded_least_recently_used(engines):
    plain_engine, _ = engines
    lm = plain_engine.lm
    a, b, c = (plain_engine.encode([p])[0] for p in PROMPTS)
    cache = PrefixCache(len(a) + len(b))
    for context in (a, b):
        cache.prefill(lm.model, [context], lm.pad_id, lm.device, 0)
    cache.prefill(lm.model, [a + [5]], lm.pad_id, lm.device, 0)  # reuses a, which then is the most recent
    assert cache.stats.stored_tokens <= cache.max_tokens
    held = [len(entry.ids) for entry in cache.entries.values()]
    # a + [5] replaced a; b (least recently used) went to make room
    assert held == [len(a) + 1] and cache.stats.evicted_tokens == len(b)
    cache.prefill(lm.model, [c], lm.pad_id, lm.device, 0)
    assert cache.stats.stored_tokens <= cache.max_tokens
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(0)


def test_counters_in_the_policy_info(engines):
    from qsteer.actors.local import local_policy

    plain_engine, cached = engines
    assert "prefix_cache" not in local_policy(plain_engine).info()[0]
    info = local_policy(cached).info()[0]["prefix_cache"]
    assert {"hits", "misses", "reused_tokens", "prefilled_tokens", "token_hit_rate"} <= set(info)
