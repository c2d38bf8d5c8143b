"""Metrics against their closed forms and small hand-computed cases."""

from __future__ import annotations

import math

import pytest

from qsteer.metrics import distinct_n, mean_pass_at_k, pass_at_k, win_rate


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 50])
def test_pass_at_k_matches_closed_form_on_grid(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_limiting_cases() -> None:
    for n in (1, 7, 200):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_large_n_stays_finite_and_monotone_in_k() -> None:
    # C(2000, 1000) overflows a float; the product form must not.
    values = [pass_at_k(2000, 3, k) for k in (1, 10, 100, 1000)]
    assert all(0.0 < v < 1.0 for v in values)
    assert values == sorted(values)
    assert values[-1] == pytest.approx(closed_form(2000, 3, 1000), rel=1e-9)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_inputs(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k() -> None:
    # pass@1 = c/n per problem: (0.5 + 0 + 1) / 3.
    assert mean_pass_at_k([(4, 2), (4, 0), (4, 4)], k=1) == pytest.approx(0.5)
    # pass@2 with n=4, c=1: 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert mean_pass_at_k([(4, 1), (4, 4)], k=2) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError):
        mean_pass_at_k([], k=1)


def test_distinct_n_hand_computed() -> None:
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the, cat, sat, the, cat, ran -> 4 unique of 6.
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat), (cat sat), (the cat), (cat ran) -> 3 unique of 4.
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams never span texts: two of two unique.
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 4) == 0.0
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["  spaced\tout\nwords "], 1) == 1.0
    assert distinct_n([], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_win_rate_hand_computed() -> None:
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4.
    a = [0.9, 0.5, 0.1, 0.3]
    b = [0.2, 0.5, 0.4, -1.0]
    assert win_rate(a, b) == pytest.approx(0.625)
    assert win_rate(b, a) == pytest.approx(1 - 0.625)
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5


@pytest.mark.parametrize("a, b", [([1.0], [1.0, 2.0]), ([], []), ([math.nan], [0.0])])
def test_win_rate_rejects_bad_inputs(a: list[float], b: list[float]) -> None:
    with pytest.raises(ValueError):
        win_rate(a, b)
