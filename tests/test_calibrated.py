"""Calibrated rewards against their defining properties (InfAlign §4.1-4.2; spec §4.3 checks 1).

C(x, y) is y's empirical CDF among the reference policy's rewards for x, ties as half: fresh
reference samples get uniform C; any increasing map of the reward leaves C unchanged; exact
ties give one half. The reference "policy" here is a real sampler of text (numbers printed
with a per-prompt law) scored by a reward that reads the text, so the wrapper is exercised
through its TRL signature on a workload whose reward law is known.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from qsteer.rewards.calibrated import (
    CalibratedReward,
    ReferenceCache,
    calibrate,
    default_t,
    reference_scores_from_samples,
    transform,
)


def number_reward(prompts, completions, completion_ids=None, **_):
    """The reward of a completion is the number it prints."""
    return [float(text) for text in completions]


class NumberPolicy:
    """Prompt "p<i>" draws numbers from its own law (a normal of its own mean and scale); seeded per call."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.calls: list[list[str]] = []

    def law(self, prompt: str) -> tuple[float, float]:
        i = int(prompt[1:])
        return math.sin(i) * 5.0, 0.5 + (i % 7)

    def draw(self, prompt: str, count: int) -> list[str]:
        mean, scale = self.law(prompt)
        return [repr(float(x)) for x in self.rng.normal(mean, scale, size=count)]

    def __call__(self, prompts, columns, num_reference):
        self.calls.append(list(prompts))
        return [self.draw(prompt, num_reference) for prompt in prompts]


def calibrated(base, policy: NumberPolicy, num_reference: int, **kwargs) -> CalibratedReward:
    return CalibratedReward(base, reference_scores_from_samples(policy, base), num_reference, **kwargs)


def test_calibrate_hand_computed_with_ties() -> None:
    reference = [3.0, 1.0, 2.0, 2.0]
    # below 1: none; 2 ties two of four (half each) above one; 2.5 beats three; 5 beats all.
    assert calibrate([0.0, 1.0, 2.0, 2.5, 5.0], reference).tolist() == [0.0, 0.125, 0.5, 0.75, 1.0]


def test_exact_ties_give_one_half() -> None:
    assert calibrate([7.0], [7.0] * 32).tolist() == [0.5]
    # A reward model that cannot tell anything apart ranks every completion at the middle.
    policy = NumberPolicy(0)
    reward = calibrated(lambda prompts, completions, **_: [1.0] * len(prompts), policy, 16)
    assert reward(prompts=["p1", "p2"], completions=["0.3", "9.0"]) == [0.5, 0.5]


def test_calibrate_rejects_nan_and_empty_reference() -> None:
    with pytest.raises(ValueError, match="NaN"):
        calibrate([1.0], [0.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        calibrate([1.0], [])


def test_fresh_reference_samples_are_uniform_kolmogorov_smirnov() -> None:
    # One fresh sample per prompt, each prompt its own law and its own M reference samples, so
    # the C values are independent; C = k/M with k uniform on 0..M, within 1/M of U[0, 1]
    # (the KS distance that fails at 1% with 1000 samples is 0.05).
    prompts = [f"p{i}" for i in range(1000)]
    reward = calibrated(number_reward, NumberPolicy(seed=1), num_reference=249)
    fresh = NumberPolicy(seed=2)
    completions = [fresh.draw(prompt, 1)[0] for prompt in prompts]
    values = np.array(reward(prompts=prompts, completions=completions))
    assert stats.kstest(values, "uniform").pvalue > 0.01
    # and a law that is not the reference's fails the same test: a shifted policy is not uniform
    shifted = [repr(float(text) + 0.5 * NumberPolicy(0).law(p)[1]) for p, text in zip(prompts, completions, strict=True)]
    assert stats.kstest(np.array(reward(prompts=prompts, completions=shifted)), "uniform").pvalue < 1e-6


def test_fresh_reference_ranks_are_exactly_uniform_at_small_m() -> None:
    # At M = 32 the law of C is discrete: M·C is uniform on {0, ..., 32} (chi-square over 33 cells).
    m = 32
    prompts = [f"p{i}" for i in range(3300)]
    reward = calibrated(number_reward, NumberPolicy(seed=3), num_reference=m)
    fresh = NumberPolicy(seed=4)
    values = np.array(reward(prompts=prompts, completions=[fresh.draw(p, 1)[0] for p in prompts]))
    ranks = np.rint(values * m).astype(int)
    assert np.allclose(ranks, values * m)
    counts = np.bincount(ranks, minlength=m + 1)
    assert stats.chisquare(counts).pvalue > 0.01


def test_mean_is_one_half_with_ties() -> None:
    # Ties aside C is not uniform, but counting ties as half keeps E[C] = 1/2 under pi_ref exactly.
    rng = np.random.default_rng(5)
    reference = rng.integers(0, 4, size=(4000, 16)).astype(float)  # a 4-valued reward: many ties
    fresh = rng.integers(0, 4, size=4000).astype(float)
    values = np.array([calibrate([y], ref)[0] for y, ref in zip(fresh, reference, strict=True)])
    assert abs(values.mean() - 0.5) < 4 * values.std() / math.sqrt(values.size)


@pytest.mark.parametrize("increasing", [lambda r: 3 * r + 1, np.exp], ids=["3r+1", "exp"])
def test_unchanged_under_increasing_maps_of_the_reward(increasing) -> None:
    def mapped(prompts, completions, **columns):
        return [float(increasing(r)) for r in number_reward(prompts, completions)]

    prompts = [f"p{i % 20}" for i in range(200)]
    plain = calibrated(number_reward, NumberPolicy(seed=6), 32)
    references = plain.reference([f"p{i}" for i in range(20)])
    completions = [NumberPolicy(seed=7).draw(p, 1)[0] for p in prompts]
    completions[:20] = [repr(float(ref[5])) for ref in references]  # exact ties with a reference sample
    expected = plain(prompts=prompts, completions=completions)
    # The same reference samples (same sampler seed), scored by the mapped reward.
    assert calibrated(mapped, NumberPolicy(seed=6), 32)(prompts=prompts, completions=completions) == expected
    assert [round(u * 64) for u in expected[:20]] == [11] * 20  # 5 below and one tie counted as half, of 32


def test_transforms_are_increasing_and_match_their_formulas() -> None:
    u = np.linspace(0, 1, 101)
    assert transform(u, "identity").tolist() == u.tolist()
    for t in (0.5, 5.0, 30.0):
        bon, won = transform(u, "bon", t), transform(u, "won", t)
        # exp(t u) up to the positive factor e^-t, which the KL coefficient absorbs
        assert np.allclose(bon, np.exp(t * u) * math.exp(-t), rtol=1e-12)
        assert np.allclose(won, -np.exp(-t * u), rtol=1e-12)
        assert np.all(np.diff(bon) > 0) and np.all(np.diff(won) > 0)
        assert bon.max() == 1.0 and won.min() == -1.0
    with pytest.raises(ValueError, match="t > 0"):
        transform(u, "bon", 0.0)
    with pytest.raises(ValueError, match="unknown transform"):
        transform(u, "log", 1.0)


def test_wrapper_transforms_the_calibrated_reward() -> None:
    prompts, completions = ["p3"] * 4, ["-100", "0.0", "1.0", "100"]
    identity = calibrated(number_reward, NumberPolicy(seed=8), 64)
    u = np.array(identity(prompts=prompts, completions=completions))
    assert u[0] == 0.0 and u[-1] == 1.0
    for kind, t in (("bon", 20.0), ("won", 5.0)):
        # the same sampler seed draws the same reference samples, so C is the same
        reward = calibrated(number_reward, NumberPolicy(seed=8), 64, transform=kind, t=t)
        assert np.allclose(reward(prompts=prompts, completions=completions), transform(u, kind, t))
    with pytest.raises(ValueError, match="reward.t"):
        calibrated(number_reward, NumberPolicy(seed=8), 64, transform="bon")


def test_default_t_comes_from_the_analytic_table() -> None:
    # infalign_calibrated_space_tool.out: "N= 4 KL=1.0 ... exp(t u) best t=  20", "N= 2 KL=1.0 ... -exp(-t u) best t=   5"
    assert default_t("bon", 4, 1.0) == 20.0
    assert default_t("won", 2, 1.0) == 5.0


def test_trl_signature_groups_prompts_and_forwards_columns() -> None:
    # TRL calls reward_funcs with keywords only: prompts, completions, completion_ids, each dataset
    # column (repeated per generation) and trainer_state / log_extra / log_metric.
    seen_columns = []

    def sampler(prompts, columns, num_reference):
        seen_columns.extend(columns)
        return [NumberPolicy(seed=9).draw(p, num_reference) for p in prompts]

    reward = CalibratedReward(number_reward, reference_scores_from_samples(sampler, number_reward), 32, "bon", 5.0)
    metrics, extra = {}, {}
    generations = 4
    prompts = [p for p in ("p1", "p2", "p3") for _ in range(generations)]
    out = reward(
        prompts=prompts,
        completions=[repr(float(i)) for i in range(len(prompts))],
        completion_ids=[[i] for i in range(len(prompts))],
        id=[p.upper() for p in prompts],
        trainer_state=object(),
        log_extra=lambda column, values: extra.__setitem__(column, values),
        log_metric=lambda name, value: metrics.__setitem__(name, value),
    )
    assert len(out) == len(prompts) and all(isinstance(v, float) for v in out)
    assert seen_columns == [{"id": "P1"}, {"id": "P2"}, {"id": "P3"}]  # one reference set per prompt
    assert metrics["calibrated_reward"] == pytest.approx(np.mean(extra["calibrated"]))
    assert np.allclose(out, transform(extra["calibrated"], "bon", 5.0))
    reward(prompts=prompts, completions=["0.0"] * len(prompts))
    assert len(seen_columns) == 3  # the second call reuses them


def test_none_rewards_pass_through_and_failed_references_are_dropped() -> None:
    def flaky(prompts, completions, **_):
        return [None if text == "fail" else float(text) for text in completions]

    def sampler(prompts, columns, num_reference):
        return [["fail", "1.0", "2.0", "3.0"] for _ in prompts]

    reward = CalibratedReward(flaky, reference_scores_from_samples(sampler, flaky), 4)
    assert reward(prompts=["a", "a"], completions=["fail", "2.0"]) == [None, 0.5]
    assert reward.reference(["a"])[0].tolist() == [1.0, 2.0, 3.0]

    broken = CalibratedReward(flaky, reference_scores_from_samples(lambda p, c, m: [["fail"]] * len(p), flaky), 1)
    with pytest.raises(ValueError, match="every reference sample of prompt 'b'"):
        broken(prompts=["b"], completions=["1.0"])


def test_reference_cache_reuses_scores_across_runs(tmp_path: Path) -> None:
    def run(policy: NumberPolicy, seed: int = 0) -> tuple[list[float], NumberPolicy]:
        sampling = {"temperature": 1.0, "stop": ("\n",)}  # a tuple reads back as a list: still a hit
        cache = ReferenceCache(tmp_path, model="number-policy", reward="number", sampling=sampling, seed=seed)
        reward = calibrated(number_reward, policy, 32, cache=cache)
        return reward(prompts=["p1", "p2", "p1"], completions=["0.1", "0.2", "0.3"]), policy

    first, policy = run(NumberPolicy(seed=10))
    assert policy.calls == [["p1", "p2"]]
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))
    stored = json.loads(files[0].read_text())
    assert stored["key"]["model"] == "number-policy" and len(stored["scores"]) == 32

    # A new process (fresh wrapper, a policy that would now draw different numbers) reads the cache.
    again, policy = run(NumberPolicy(seed=11))
    assert policy.calls == [] and again == first
    # Another seed is another reference set.
    _, policy = run(NumberPolicy(seed=11), seed=1)
    assert policy.calls == [["p1", "p2"]]


def test_reference_cache_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    cache = ReferenceCache(tmp_path, model="m", reward="r")
    path = cache.store("prompt", 3, [1.0, 2.0, 3.0])
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.store("prompt", 3, [4.0, 5.0, 6.0])
    assert path.read_text() == before  # the old file is whole, and no temporary file is left behind
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    monkeypatch.undo()
    assert cache.load("prompt", 3) == [1.0, 2.0, 3.0]
    assert cache.load("prompt", 4) is None  # M is part of the key
    path.write_text("{torn")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        cache.load("prompt", 3)


def test_chat_prompts_are_keyed_by_their_messages() -> None:
    chat = [{"role": "user", "content": "p5"}]

    def sampler(prompts, columns, num_reference):
        return [NumberPolicy(seed=12).draw(p[-1]["content"], num_reference) for p in prompts]

    reward = CalibratedReward(number_reward, reference_scores_from_samples(sampler, number_reward), 8)
    assert len(reward(prompts=[chat, chat], completions=["0.0", "1.0"])) == 2
    assert len(reward._sorted) == 1
