"""The analytic calibrated-space tool reproduces the spec's table (reward_guided.md §4.3).

Expected numbers are copied from /work/shared/papers/checks/infalign_calibrated_space_tool.out
(the output of the spec author's own numpy tool, infalign_calibrated_space_tool.py, with the
same grid of 4000 cells and the same t grid), rounded there to 4 decimals; qsteer's
reimplementation must give them to that precision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qsteer.metrics.calibrated_space import (
    T_GRID,
    at_beta,
    at_kl,
    best_t,
    evaluate,
    grid,
    optimal_best_of_n,
    reference_best_of_n,
    tilted,
)

# From infalign_calibrated_space_tool.out, lines 1-15:
# (N, KL, identity std, identity BoN, identity WoN, exp best t, exp BoN, exp std, -exp best t, -exp WoN)
TABLE = [
    (1, 0.5, 0.7737, 0.7737, 0.7737, 0.5, 0.7734, 0.7734, 0.5, 0.7734),
    (1, 1.0, 0.8646, 0.8646, 0.8646, 0.5, 0.8643, 0.8643, 0.5, 0.8644),
    (1, 2.0, 0.9502, 0.9502, 0.9502, 0.5, 0.9502, 0.9502, 0.5, 0.9502),
    (2, 0.5, 0.7737, 0.7917, 0.8403, 5, 0.8154, 0.7461, 3, 0.8591),
    (2, 1.0, 0.8646, 0.8733, 0.9368, 5, 0.8964, 0.8390, 5, 0.9482),
    (2, 2.0, 0.9502, 0.9515, 0.9913, 8, 0.9626, 0.9264, 20, 0.9930),
    (4, 0.5, 0.7737, 0.7998, 0.8860, 12, 0.8726, 0.7014, 8, 0.9474),
    (4, 1.0, 0.8646, 0.8770, 0.9745, 20, 0.9395, 0.7546, 20, 0.9929),
    (4, 2.0, 0.9502, 0.9520, 0.9995, 30, 0.9822, 0.8413, 30, 0.9999),
    (8, 0.5, 0.7737, 0.8036, 0.9116, 30, 0.9282, 0.6524, 20, 0.9929),
    (8, 1.0, 0.8646, 0.8787, 0.9884, 30, 0.9706, 0.7286, 30, 0.9999),
    (8, 2.0, 0.9502, 0.9523, 1.0000, 30, 0.9882, 0.8413, 30, 1.0000),
    (32, 0.5, 0.7737, 0.8063, 0.9305, 30, 0.9603, 0.6524, 30, 1.0000),
    (32, 1.0, 0.8646, 0.8799, 0.9942, 30, 0.9788, 0.7286, 30, 1.0000),
    (32, 2.0, 0.9502, 0.9524, 1.0000, 30, 0.9889, 0.8413, 8, 1.0000),
]
PRINTED = 5e-5 + 1e-9  # half a unit in the 4th decimal


@pytest.mark.parametrize("row", TABLE, ids=[f"N={r[0]}-KL={r[1]}" for r in TABLE])
def test_reproduces_the_table(row) -> None:
    n, kl, id_std, id_bon, id_won, exp_t, exp_bon, exp_std, negexp_t, negexp_won = row
    identity = at_kl("identity", None, n, kl)
    assert identity.kl == pytest.approx(kl, abs=1e-9)
    assert (identity.standard, identity.best_of_n, identity.worst_of_n) == pytest.approx((id_std, id_bon, id_won), abs=PRINTED)
    t, best = best_t("bon", n, kl)
    assert t == exp_t and best.best_of_n == pytest.approx(exp_bon, abs=PRINTED)
    assert best.standard == pytest.approx(exp_std, abs=PRINTED)
    t, worst = best_t("won", n, kl)
    assert t == negexp_t and worst.worst_of_n == pytest.approx(negexp_won, abs=PRINTED)


@pytest.mark.parametrize("kl", [0.5, 1.0, 2.0])
def test_identity_is_best_for_the_standard_win_rate_and_exp_for_best_of_n(kl: float) -> None:
    # The tilted family exp(u/beta) maximises E[u] at a given KL, so no transform beats identity on
    # the standard win rate; for Best-of-N (N >= 2) the exponential transform does beat it.
    identity = at_kl("identity", None, 4, kl)
    for t in T_GRID:
        for kind in ("bon", "won"):
            assert at_kl(kind, t, 4, kl).standard <= identity.standard + 1e-12
    for n in (2, 4, 8):
        identity = at_kl("identity", None, n, kl)
        assert best_t("bon", n, kl)[1].best_of_n > identity.best_of_n + 0.01
        assert best_t("won", n, kl)[1].worst_of_n > identity.worst_of_n
    # With N = 1 the procedure is plain sampling, and nothing beats identity.
    identity = at_kl("identity", None, 1, kl)
    assert best_t("bon", 1, kl)[1].best_of_n <= identity.best_of_n + 1e-12


def test_best_of_n_of_the_reference() -> None:
    # .out: "2 WR(BoN(ref) vs ref)= 0.6667 ... KL= 0.1931", "4 ... 0.8 ... 0.6363", "8 ... 0.8889 ... 1.2044"
    for n, wr, kl in ((2, 0.6667, 0.1931), (4, 0.8, 0.6363), (8, 0.8889, 1.2044)):
        point = reference_best_of_n(n)
        assert point.standard == pytest.approx(wr, abs=PRINTED) and point.kl == pytest.approx(kl, abs=PRINTED)
        # and the closed forms, to the grid's resolution
        assert point.standard == pytest.approx(n / (n + 1), abs=1e-6)
        assert point.kl == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-5)
        # Phi = log u at beta = 1/(N-1) is the same policy: pi ∝ u^(N-1) is Best-of-N's density N u^(N-1).
        log_policy = evaluate(tilted(np.log(grid()), 1.0 / (n - 1)), n)
        assert log_policy.standard == pytest.approx(n / (n + 1), abs=1e-6)
        assert log_policy.kl == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-5)


def test_fixed_point_optimum_bounds_the_best_exponential() -> None:
    # .out: "fixed-point optimum N=4 beta=0.1: KL=0.891 BoN_opt=0.9311 | best exp t=20 BoN=0.9292 | identity BoN=0.8638"
    optimum = optimal_best_of_n(4, 0.1)
    assert optimum.kl == pytest.approx(0.891, abs=5e-4) and optimum.best_of_n == pytest.approx(0.9311, abs=PRINTED)
    t, best = best_t("bon", 4, optimum.kl)
    assert t == 20 and best.best_of_n == pytest.approx(0.9292, abs=PRINTED)
    assert at_kl("identity", None, 4, optimum.kl).best_of_n == pytest.approx(0.8638, abs=PRINTED)
    assert best.best_of_n <= optimum.best_of_n


def test_reference_and_large_beta_limits() -> None:
    # .out: "pi_ref: KL,std,BoN4,WoN4 = [0.0, 0.5, 0.5, 0.5]"
    reference = evaluate(np.full(4000, 1 / 4000), 4)
    assert (reference.kl, reference.standard, reference.best_of_n, reference.worst_of_n) == pytest.approx((0, 0.5, 0.5, 0.5))
    far = at_beta("bon", 5.0, 1e6, 4)
    assert far.kl < 1e-9 and far.best_of_n == pytest.approx(0.5, abs=1e-6)
