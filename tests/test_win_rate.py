"""Win rates under sampling, Best-of-N and worst-of-N, and the KL estimators, against their definitions.

The closed form must equal brute-force enumeration of the draws it averages over; the
reference against itself wins half the time; Best-of-N of the reference against one reference
sample wins N/(N+1) (exactly in expectation for the unbiased subset form, which is checked by
enumerating every rank pattern of two continuous pools); k1 and k3 recover a known KL.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from qsteer.metrics.inference_win_rate import kl_estimate, prompt_win_rate, win_rate


def brute_force(candidate, reference, procedure, n, opponent, draws) -> float:
    """Average of 1{T(A) > T(B)} + 1/2 1{=} over every equally likely set of draws from both pools."""

    def outcomes(pool, proc, size):
        if proc == "sample":
            return list(pool)
        index_sets = (
            itertools.combinations(range(len(pool)), size)
            if draws == "subsets"
            else itertools.product(range(len(pool)), repeat=size)
        )
        pick = max if proc == "bon" else min
        return [pick(pool[i] for i in indices) for indices in index_sets]

    a = outcomes(candidate, procedure, n)
    b = outcomes(reference, procedure, n) if opponent == "procedure" else list(reference)
    return float(np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b]))


@pytest.mark.parametrize("draws", ["subsets", "replacement"])
@pytest.mark.parametrize("opponent", ["procedure", "sample"])
@pytest.mark.parametrize("procedure, n", [("sample", 1), ("bon", 2), ("bon", 3), ("won", 2), ("won", 3)])
def test_closed_form_equals_enumeration(procedure, n, opponent, draws) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        # few distinct values, so ties within and across the pools are common
        candidate = rng.integers(0, 4, size=5).astype(float).tolist()
        reference = rng.integers(0, 4, size=4).astype(float).tolist()
        expected = brute_force(candidate, reference, procedure, n, opponent, draws)
        got = prompt_win_rate(candidate, reference, procedure, n, opponent, draws)
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("draws", ["subsets", "replacement"])
@pytest.mark.parametrize("procedure, n", [("sample", 1), ("bon", 4), ("won", 4)])
def test_same_pool_on_both_sides_is_exactly_one_half(procedure, n, draws) -> None:
    pool = [0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 5.0]
    assert prompt_win_rate(pool, pool, procedure, n, draws=draws) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("draws", ["subsets", "replacement"])
def test_reference_against_itself_is_one_half_within_its_interval(n, draws) -> None:
    # Independent pools of 8 samples per side from each prompt's own reward law, some with ties.
    rng = np.random.default_rng(n)
    laws = [(rng.normal(), rng.uniform(0.1, 2.0), i % 3 == 0) for i in range(300)]

    def pool(mean, scale, discrete):
        values = rng.normal(mean, scale, size=8)
        return np.round(values).tolist() if discrete else values.tolist()

    candidate = [pool(*law) for law in laws]
    reference = [pool(*law) for law in laws]
    for procedure in (("sample", "bon", "won") if n > 1 else ("sample",)):
        result = win_rate(candidate, reference, procedure, n, draws=draws)
        assert result.ci_low < 0.5 < result.ci_high
        assert result.ci_high - result.ci_low < 0.1  # and the interval is informative
        assert result.num_prompts == 300 and len(result.per_prompt) == 300


def rank_patterns(m: int, k: int):
    """Every way two continuous i.i.d. pools of sizes m and k interleave; all are equally likely."""
    for chosen in itertools.combinations(range(m + k), m):
        rest = sorted(set(range(m + k)) - set(chosen))
        yield [float(x) for x in chosen], [float(x) for x in rest]


@pytest.mark.parametrize("n, m, k", [(1, 3, 3), (2, 2, 3), (4, 4, 4), (4, 6, 3), (8, 8, 5)])
def test_best_of_n_of_the_reference_against_the_reference(n, m, k) -> None:
    # Exact expectation over continuous pools: enumerate every rank pattern of the two pools.
    patterns = list(rank_patterns(m, k))
    subsets = np.mean([prompt_win_rate(a, b, "bon", n, opponent="sample") for a, b in patterns])
    assert subsets == pytest.approx(n / (n + 1), abs=1e-12)  # unbiased, whatever the pool sizes
    worst = np.mean([prompt_win_rate(a, b, "won", n, opponent="sample") for a, b in patterns])
    assert worst == pytest.approx(1 / (n + 1), abs=1e-12)
    # The plug-in (draws with replacement) is biased at small pools: the reference sample ranks
    # uniformly at K in 0..m among the candidate's pool, and wins with probability (K/m)^N.
    plug_in = np.mean([prompt_win_rate(a, b, "bon", n, opponent="sample", draws="replacement") for a, b in patterns])
    assert plug_in == pytest.approx(1 - sum((i / m) ** n for i in range(m + 1)) / (m + 1), abs=1e-12)


def test_best_of_n_against_best_of_n_recovers_a_known_win_rate() -> None:
    # Candidate rewards are the max of 2 reference draws (CDF u^2 in calibrated space). Best-of-N
    # of it against Best-of-N of the reference: the max of N candidate draws has CDF u^(2N), the
    # reference's u^N, so W = integral of u^N d(u^(2N)) = 2/3 for every N.
    rng = np.random.default_rng(3)
    n, prompts = 4, 2000
    candidate = rng.uniform(size=(prompts, n, 2)).max(axis=2).tolist()
    reference = rng.uniform(size=(prompts, n)).tolist()
    # a 4-sigma interval: this checks the estimate's bias, not the 95% interval's coverage
    for procedure in ("bon", "sample"):  # plain sampling: integral of u d(u^2) = 2/3 as well
        result = win_rate(candidate, reference, procedure, n, confidence=0.99994)
        assert result.ci_low < 2 / 3 < result.ci_high
    # worst-of-N: the min of N candidate draws has CDF 1 - (1 - u^2)^N, the reference's 1 - (1 - u)^N
    u = np.linspace(0, 1, 200001)
    density = np.gradient(1 - (1 - u**2) ** n, u)
    worst = float(np.sum(density * (1 - (1 - u) ** n)) * (u[1] - u[0]))
    result = win_rate(candidate, reference, "won", n, confidence=0.99994)
    assert result.ci_low < worst < result.ci_high and worst > 0.75


def test_one_sample_per_side_is_the_paired_comparison() -> None:
    # With one sample per side per prompt, the win rate is qsteer.metrics.comparison's paired one.
    from qsteer.metrics.comparison import win_rate as paired

    rng = np.random.default_rng(6)
    a, b = rng.integers(0, 5, size=50).tolist(), rng.integers(0, 5, size=50).tolist()
    assert win_rate([[x] for x in a], [[y] for y in b]).win_rate == pytest.approx(paired(a, b), abs=1e-12)


def test_one_prompt_interval_and_input_errors() -> None:
    single = win_rate([[1.0, 2.0]], [[0.0, 3.0]])
    assert single.win_rate == 0.5 and (single.ci_low, single.ci_high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="same prompts"):
        win_rate([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="at least N=4"):
        prompt_win_rate([1.0, 2.0], [1.0, 2.0, 3.0, 4.0], "bon", 4)
    with pytest.raises(ValueError, match="NaN"):
        prompt_win_rate([math.nan], [1.0])
    with pytest.raises(ValueError, match="unknown procedure"):
        prompt_win_rate([1.0], [1.0], "beam", 2)


def test_kl_estimators_recover_a_known_kl() -> None:
    # Sequences of 6 tokens, each drawn from p (candidate) over 5 symbols; the reference is q.
    # The sequence KL is 6·KL(p||q).
    rng = np.random.default_rng(4)
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = 6 * float(np.sum(p * np.log(p / q)))
    tokens = rng.choice(5, size=(200, 10, 6), p=p)  # 200 prompts, 10 samples each
    cand, ref = np.log(p)[tokens].tolist(), np.log(q)[tokens].tolist()
    for estimator in ("k1", "k3"):
        kl = kl_estimate(cand, ref, estimator)
        assert kl.estimator == estimator and kl.num_samples == 2000
        assert abs(kl.per_sequence - exact) < 4 * kl.standard_error
        assert kl.per_token == pytest.approx(kl.per_sequence / 6)
    # k3 is never negative per sample, k1 can be; both vanish against an identical reference
    samples = kl_estimate(cand[:1], ref[:1], "k3")
    assert samples.per_sequence >= 0
    same = kl_estimate(cand, cand, "k1")
    assert same.per_sequence == 0.0 and kl_estimate(cand, cand, "k3").per_sequence == 0.0


def test_k3_has_lower_variance_near_the_reference() -> None:
    rng = np.random.default_rng(5)
    p = np.array([0.26, 0.25, 0.25, 0.24])
    q = np.full(4, 0.25)
    tokens = rng.choice(4, size=(100, 20, 8), p=p)
    cand, ref = np.log(p)[tokens].tolist(), np.log(q)[tokens].tolist()
    assert kl_estimate(cand, ref, "k3").standard_error < kl_estimate(cand, ref, "k1").standard_error / 5


def test_kl_input_errors() -> None:
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate([[[0.0]]], [[[0.0]]], "k2")
    with pytest.raises(ValueError, match="prompt 0, sample 0"):
        kl_estimate([[[0.0, -1.0]]], [[[0.0]]])
