"""Entropy Adaptive Decoding (lossy): its entropy, its switch rule, and its two limits (all small, all large),
on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from qsteer.decoding import ead
from qsteer.decoding.drafters.layerskip import skipping
from qsteer.decoding.ead import EADConfig
from qsteer.engines.base import SamplingParams

PROMPTS = ["Write one sentence about the sea.", "List three colours."]
NEW = 16


def ead_params(tau: float, **draft) -> SamplingParams:
    spec = {"kind": "ead", "entropy_threshold": tau, **draft}
    return SamplingParams(max_new_tokens=NEW, temperature=0, speculative=spec)


def small_greedy(engine, prompt: list[int], skip, steps: int) -> list[int]:
    """The skipped model's greedy tokens, from full forwards of the growing sequence (no cache)."""
    seq = list(prompt)
    with torch.inference_mode(), skipping(engine.model, skip):
        for _ in range(steps):
            token = int(engine.model(input_ids=torch.tensor([seq]), logits_to_keep=1).logits[0, -1].argmax())
            seq.append(token)
            if token in engine.eos_token_ids:
                break
    return seq[len(prompt):]


def test_entropy_in_bits():
    vocab = 49152
    assert ead.entropy_bits(torch.zeros(vocab)).item() == pytest.approx(math.log2(vocab), abs=1e-4)
    assert math.log2(vocab) == pytest.approx(15.585, abs=1e-3)
    assert ead.entropy_bits(torch.tensor([0.0, 0.0, float("-inf")])).item() == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.full((2, 5), float("-inf"))
    one_hot[:, 2] = 0.0
    assert ead.entropy_bits(one_hot).tolist() == [0.0, 0.0]  # no nan from 0 * log 0


def test_switch_rule_window_and_dwell():
    cfg = EADConfig(entropy_threshold=2.0, entropy_window=3, min_dwell=2)
    assert ead.next_model("small", 2, [9.0, 0.0, 0.0, 3.0], cfg) == "small"  # mean of the last 3 is 1
    assert ead.next_model("small", 2, [0.0, 3.0, 3.5], cfg) == "large"
    assert ead.next_model("small", 1, [0.0, 3.0, 3.5], cfg) == "small"  # still dwelling
    assert ead.next_model("large", 1, [0.0], cfg) == "large"
    assert ead.next_model("large", 2, [2.0], cfg) == "small"  # exactly tau is not above it
    assert ead.next_model("small", 0, [5.0], EADConfig(min_dwell=0)) == "large"


def test_infinite_threshold_is_the_small_model(tiny_engine):
    engine = tiny_engine
    ids = engine.encode(PROMPTS)
    params = ead_params(float("inf"))
    skip = ead.small_model(EADConfig(**params.speculative), engine.lm).skip
    for prompt, (c,) in zip(ids, engine.generate(ids, params), strict=True):
        assert c.token_ids == small_greedy(engine, prompt, skip, NEW)
        assert c.spec["lossy"] and c.spec["large_fraction"] == 0 and c.spec["switches"] == 0
        assert c.spec["small_tokens"] == len(c.token_ids) and c.spec["small_prefill_tokens"] == len(prompt)


def test_minus_infinite_threshold_is_the_large_model_after_the_first_token(tiny_engine):
    engine = tiny_engine
    ids = engine.encode(PROMPTS)
    params = ead_params(float("-inf"), min_dwell=0)
    skip = ead.small_model(EADConfig(**params.speculative), engine.lm).skip
    for prompt, (c,) in zip(ids, engine.generate(ids, params), strict=True):
        first = small_greedy(engine, prompt, skip, 1)
        (large,) = engine.generate([prompt + first], SamplingParams(max_new_tokens=NEW - 1, temperature=0))[0]
        assert c.token_ids == first + large.token_ids
        assert c.spec["switches"] == 1 and c.spec["large_tokens"] == len(c.token_ids) - 1
        # the large model catches up on the whole prompt and the small model's token
        assert c.spec["switch_prefill_tokens"] == c.spec["large_prefill_tokens"] == len(prompt) + 1


def test_large_fraction_grows_as_the_threshold_falls(tiny_engine):
    engine = tiny_engine
    ids = engine.encode(PROMPTS)
    fractions = [[c.spec["large_fraction"] for (c,) in engine.generate(ids, ead_params(tau))] for tau in (7.0, 5.0, 3.0)]
    print("large fractions at tau 7, 5, 3 bits:", fractions)
    for row in zip(*fractions, strict=True):
        assert list(row) == sorted(row)
    assert fractions[0] != fractions[-1]  # the thresholds actually change which model decodes


def test_sampled_rows_are_reproducible_and_counted(tiny_engine):
    engine = tiny_engine
    ids = engine.encode(PROMPTS[:1])
    params = SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=3,
                            speculative={"kind": "ead", "entropy_threshold": 5.0})
    (c,), (again,) = engine.generate(ids, params)[0], engine.generate(ids, params)[0]
    assert c.token_ids == again.token_ids and c.spec == again.spec
    assert c.spec["small_tokens"] + c.spec["large_tokens"] == len(c.token_ids) == len(c.logprobs)
    assert c.spec["large_fraction"] == pytest.approx(c.spec["large_tokens"] / len(c.token_ids))
