"""Protocol checks every engine must pass; test_engine.py (hf) and test_vllm_engine.py run them."""

from __future__ import annotations

import pytest

from qsteer.engines.base import SamplingParams


def samples_do_not_depend_on_batching(engine, ids: list[list[int]], keys: list[str]) -> None:
    """Sample j of a prompt depends only on (seed, id, j): not on n, neighbours or chunking.

    In float32 a batch's shape moves the hf engine's numbers in the last bits (qsteer.decoding.plain),
    so on an ill-conditioned model (the tiny random one) run this in float64."""
    assert len(ids) == 4
    params = SamplingParams(n=4, max_new_tokens=16, seed=7)
    together = engine.generate(ids, params, keys)
    again = engine.generate(ids, params, keys)
    alone = engine.generate(ids[2:3], SamplingParams(n=2, max_new_tokens=16, seed=7), keys[2:3])
    rows, engine.max_batch_rows = engine.max_batch_rows, 3
    try:
        chunked = engine.generate(ids, params, keys)
    finally:
        engine.max_batch_rows = rows
    tokens = lambda out: [[c.token_ids for c in r] for r in out]  # noqa: E731
    assert all(len(r) == 4 for r in together)
    assert tokens(again) == tokens(together) == tokens(chunked)
    assert tokens(alone)[0] == tokens(together)[2][:2]
    other_seed = engine.generate(ids[:1], SamplingParams(n=4, max_new_tokens=16, seed=8), keys[:1])
    assert tokens(other_seed) != tokens(together)[:1]
    assert len({tuple(t) for t in tokens(together)[0]}) > 1  # n samples are distinct draws


def stop_strings_cut_the_text(engine, stop: str = ".") -> None:
    ids = engine.encode(["Write three sentences about rain."])
    free = engine.generate(ids, SamplingParams(n=4, max_new_tokens=40, seed=3))[0]
    stopped = engine.generate(ids, SamplingParams(n=4, max_new_tokens=40, seed=3, stop=[stop]))[0]
    assert any(stop in a.text for a in free), f"no free sample contains {stop!r}: the check would be empty"
    for a, b in zip(free, stopped, strict=True):
        assert stop not in b.text
        if stop in a.text:
            assert b.finish_reason == "stop"
            assert a.text.startswith(b.text)
            assert a.token_ids[: len(b.token_ids)] == b.token_ids
        else:
            assert b.finish_reason == a.finish_reason


def too_long_prompt_is_refused_by_name(engine) -> None:
    with pytest.raises(ValueError, match="'long'.*context length"):
        engine.generate([[1] * engine.context_length], SamplingParams(max_new_tokens=4), keys=["long"])
