"""The analytic calibrated-space tool (InfAlign, Balashankar et al. 2024, §4.3 of the spec).

A calibrated reward u is a completion's CDF among the reference policy's rewards for the same
prompt, so under pi_ref it is Uniform[0, 1] (no ties) whatever the prompt and reward model.
KL-regularised RL with reward Phi(u) converges to pi ∝ pi_ref·exp(Phi(u)/beta), which in
calibrated space is a density on [0, 1]: its KL to pi_ref and its win rates against pi_ref
under an inference-time procedure are plain integrals. This module computes them on a grid
of `GRID_SIZE` cells (cell masses p_i ∝ exp(Phi(u_i)/beta) at u_i = (i + 1/2)/M, CDF F):

    KL            = sum_i p_i log(M p_i)
    standard WR   = sum_i p_i u_i                                   (vs one pi_ref sample)
    Best-of-N WR  = sum_i (F_i^N - F_{i-1}^N) u_i^N                  (BoN_N(pi) vs BoN_N(pi_ref))
    worst-of-N WR = sum_i ((1-F_{i-1})^N - (1-F_i)^N)(1 - (1-u_i)^N) (WoN_N(pi) vs WoN_N(pi_ref))

Because the problem no longer depends on the prompt or the reward model, a transform and its
parameter t can be chosen once per (procedure, N, KL budget): `default_t`. With this grid the
module reproduces `shared/papers/checks/infalign_calibrated_space_tool.out` to its 4 printed
decimals (tests/test_calibrated_space.py): identity is the best transform for the standard win
rate at every KL; exp(t u) beats it on the Best-of-N win rate for N >= 2 (N=4, KL=1: 0.940 at
t=20 against 0.877), -exp(-t u) on worst-of-N; Best-of-N of pi_ref against pi_ref has win rate
N/(N+1) at KL log N - (N-1)/N.

The transforms are the reward-side definitions too (qsteer.rewards.calibrated uses these).
Transforms matter only up to a positive affine map (a·Phi + b with a > 0 is Phi at beta/a), so
Best-of-N's exp(t u) is computed as exp(t (u - 1)) = e^-t·exp(t u): the same policies along a
beta sweep, but rewards in (0, 1] instead of up to e^t, which TRL's float32 rewards and a
human-sized beta need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

Transform = Literal["identity", "bon", "won"]
Procedure = Literal["sample", "bon", "won"]
TRANSFORMS: tuple[str, ...] = ("identity", "bon", "won")

GRID_SIZE = 4000  # as the check tool: win rates move by < 1e-4 when it doubles
# The check tool's t grid; its best t is the argmax over exactly these values.
T_GRID: tuple[float, ...] = (0.5, 1, 2, 3, 5, 8, 12, 20, 30)


def transform(u: np.ndarray | Sequence[float], kind: str, t: float | None = None) -> np.ndarray:
    """Phi(u) for a calibrated reward u in [0, 1]: identity, exp(t u) for Best-of-N, -exp(-t u) for worst-of-N.

    Best-of-N's exp(t u) is returned as exp(t (u - 1)), the same transform up to the positive
    factor e^-t (see the module docstring); worst-of-N's -exp(-t u) already lies in [-1, 0).
    """
    u = np.asarray(u, dtype=np.float64)
    if kind == "identity":
        return u.copy()
    if kind not in ("bon", "won"):
        raise ValueError(f"unknown transform {kind!r}; choose one of {TRANSFORMS}")
    if t is None or not t > 0:
        raise ValueError(f"transform {kind!r} needs t > 0, got t={t!r}")
    return np.exp(t * (u - 1.0)) if kind == "bon" else -np.exp(-t * u)


def grid(size: int = GRID_SIZE) -> np.ndarray:
    """Cell midpoints u_i = (i + 1/2)/M of [0, 1]."""
    return (np.arange(size) + 0.5) / size


def tilted(phi: np.ndarray, beta: float) -> np.ndarray:
    """Cell masses of pi ∝ pi_ref·exp(phi/beta): the optimum of KL-regularised RL with reward phi."""
    logits = np.asarray(phi, dtype=np.float64) / beta
    masses = np.exp(logits - logits.max())
    return masses / masses.sum()


@dataclass(frozen=True)
class CalibratedPoint:
    """A policy in calibrated space: its KL to pi_ref and its win rates against pi_ref."""

    kl: float
    standard: float  # win rate of one sample against one pi_ref sample
    best_of_n: float  # BoN_N(pi) against BoN_N(pi_ref)
    worst_of_n: float  # WoN_N(pi) against WoN_N(pi_ref)
    n: int
    beta: float = math.nan  # the KL coefficient that produced it, when it came from a transform


def evaluate(masses: np.ndarray, n: int, beta: float = math.nan) -> CalibratedPoint:
    """KL and the three win rates of the policy with these cell masses (on the grid of the same size)."""
    masses = np.asarray(masses, dtype=np.float64)
    size = masses.size
    u = grid(size)
    cdf = np.cumsum(masses)
    cdf_before = np.concatenate([[0.0], cdf[:-1]])
    kl = kl_to_reference(masses)
    standard = float(np.sum(masses * u))
    # Best-of-N of pi puts mass F_i^N - F_{i-1}^N on cell i; Best-of-N of pi_ref has CDF u^N.
    best = float(np.sum((cdf**n - cdf_before**n) * u**n))
    # Worst-of-N: the minimum of N draws has CDF 1 - (1 - F)^N, for pi and for pi_ref alike.
    worst = float(np.sum(((1 - cdf_before) ** n - (1 - cdf) ** n) * (1 - (1 - u) ** n)))
    return CalibratedPoint(kl=kl, standard=standard, best_of_n=best, worst_of_n=worst, n=n, beta=beta)


def kl_to_reference(masses: np.ndarray) -> float:
    """KL(pi || pi_ref) in nats for cell masses of pi on the grid (pi_ref puts 1/M on each cell)."""
    return float(np.sum(masses * np.log(np.maximum(masses * masses.size, 1e-300))))


def at_beta(kind: str, t: float | None, beta: float, n: int, size: int = GRID_SIZE) -> CalibratedPoint:
    """The RL optimum for transform (kind, t) at KL coefficient beta."""
    return evaluate(tilted(transform(grid(size), kind, t), beta), n, beta)


def at_kl(kind: str, t: float | None, n: int, kl: float, size: int = GRID_SIZE) -> CalibratedPoint:
    """The RL optimum for transform (kind, t) whose KL to pi_ref is `kl`: bisection on log beta.

    KL falls as beta grows; 60 halvings of log beta in [-30, 30] pin it to 1e-16.
    """
    if not kl > 0:
        raise ValueError(f"at_kl needs a KL budget > 0, got {kl}")
    phi = transform(grid(size), kind, t)
    low, high = -30.0, 30.0
    for _ in range(60):
        mid = (low + high) / 2
        if kl_to_reference(tilted(phi, math.exp(mid))) > kl:
            low = mid
        else:
            high = mid
    beta = math.exp((low + high) / 2)
    return evaluate(tilted(phi, beta), n, beta)


def best_t(
    kind: Literal["bon", "won"], n: int, kl: float, ts: Sequence[float] = T_GRID, size: int = GRID_SIZE
) -> tuple[float, CalibratedPoint]:
    """The t in `ts` whose transform wins most under its procedure (BoN for "bon", WoN for "won") at this KL."""
    if kind not in ("bon", "won"):
        raise ValueError(f"best_t chooses t for 'bon' or 'won', got {kind!r}")
    metric = "best_of_n" if kind == "bon" else "worst_of_n"
    # max() keeps the first of equal values: the smallest t, as the check tool does.
    return max(((t, at_kl(kind, t, n, kl, size)) for t in ts), key=lambda pair: getattr(pair[1], metric))


@lru_cache(maxsize=256)
def default_t(kind: Literal["bon", "won"], n: int, kl: float) -> float:
    """The default `reward.t` for the transform serving Best-of-N ("bon") or worst-of-N ("won")
    with this N at this KL budget (nats): the check tool's best t on its grid.

    E.g. Best-of-4 at KL 1.0 gives t = 20, Best-of-2 t = 5. It grows with N and with the budget.
    With N = 1 the procedure is plain sampling and no transform beats identity (the grid's
    smallest t, 0.5, comes within 3e-4 of it): use `transform=identity` there.
    """
    if n < 1:
        raise ValueError(f"default_t needs N >= 1, got {n}")
    return float(best_t(kind, n, kl)[0])


def optimal_best_of_n(n: int, beta: float, iterations: int = 4000, size: int = GRID_SIZE) -> CalibratedPoint:
    """The inference-aware optimum for Best-of-N at this beta, by InfAlign's fixed point.

    The optimum is pi ∝ pi_ref·exp(R/beta) with R(v) = -N^2 ∫_v^1 F(u)^(N-1) u^(N-1) du, where F is
    the optimum's own CDF; damped iteration p <- 0.8 p + 0.2·tilted(R(p)) converges (the check
    tool's scheme). It bounds what any transform can reach: the best exp(t u) comes within 0.002.
    """
    u = grid(size)
    masses = np.full(size, 1.0 / size)
    for _ in range(iterations):
        cdf = np.cumsum(masses)
        density = n * n * cdf ** (n - 1) * u ** (n - 1) / size
        reward = -np.cumsum(density[::-1])[::-1]
        masses = 0.8 * masses + 0.2 * tilted(reward, beta)
    return evaluate(masses, n, beta)


def reference_best_of_n(n: int, size: int = GRID_SIZE) -> CalibratedPoint:
    """Best-of-N of pi_ref itself (cell masses u^N differences): standard win rate N/(N+1), KL log N - (N-1)/N."""
    edges = np.arange(size + 1) / size
    return evaluate(np.diff(edges**n), n)
