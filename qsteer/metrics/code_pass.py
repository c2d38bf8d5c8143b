"""pass@k curves for code search, plain and with public-test filtering, as PlanSearch reports them.

A problem's candidates each carry two verdicts: `passed` (the full, hidden tests) and
`passed_public` (the examples in the problem statement, the only tests a submitter may run).

- Plain pass@k (Chen et al., 2021) for k = 1..n: the unbiased estimator
  1 - C(n-c, k) / C(n, k) of `qsteer.metrics.correctness.pass_at_k`, averaged over problems.
- Public filtering (the PlanSearch notebooks): keep only the n' candidates that pass the
  public tests and count as correct the c' of them that also pass the hidden ones; pass@k is
  then computed on (n', c'). A candidate that passes the hidden tests but not the public ones
  is not counted: the filter has thrown it away.

The guard. The estimator's shortcut "1 if n - c < k" (kept by the reference's CodeRM copy)
answers 1.0 for n' = c' = 0, i.e. when every candidate failed the public tests; the reference
notes report 0 there. The same shortcut also answers 1.0 when 0 < n' < k and c' = 0 (a filtered
pool of wrong codes smaller than k), so the guard here is c' = 0 => 0, which covers n' = 0. For
k > n' with c' > 0 every filtered code is submitted and one is correct, so the value is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qsteer.metrics.correctness import pass_at_k

__all__ = ["CodeCounts", "code_counts", "pass_at_k_curve", "public_filtered_pass_at_k", "public_filtered_pass_at_k_curve"]


@dataclass(frozen=True)
class CodeCounts:
    """One problem's candidate counts."""

    n: int
    """Candidates generated."""
    c: int
    """Candidates passing the hidden tests."""
    n_public: int
    """Candidates passing the public tests (n')."""
    c_public: int
    """Candidates passing both the public and the hidden tests (c')."""


def code_counts(passed: Sequence[bool], passed_public: Sequence[bool]) -> CodeCounts:
    """Count one problem's verdicts, given per candidate in the same order."""
    if len(passed) != len(passed_public):
        raise ValueError(f"{len(passed)} hidden-test verdicts but {len(passed_public)} public-test verdicts")
    return CodeCounts(
        n=len(passed),
        c=sum(map(bool, passed)),
        n_public=sum(map(bool, passed_public)),
        c_public=sum(1 for hidden, public in zip(passed, passed_public, strict=True) if hidden and public),
    )


def public_filtered_pass_at_k(n_public: int, c_public: int, k: int) -> float:
    """pass@k over the n' candidates that pass the public tests, c' of them correct.

    k may exceed n' (the filter keeps fewer than k): all n' are then submitted.
    """
    if k < 1 or not 0 <= c_public <= n_public:
        raise ValueError(f"needs k >= 1 and 0 <= c' <= n'; got n'={n_public}, c'={c_public}, k={k}")
    if c_public == 0:
        # The guard: the estimator's "n - c < k => 1" shortcut would answer 1.0 here.
        return 0.0
    if n_public - c_public < k:
        return 1.0
    return pass_at_k(n_public, c_public, k)


def pass_at_k_curve(counts: Sequence[CodeCounts], max_k: int | None = None) -> list[float]:
    """Mean pass@k over problems for k = 1..max_k (default: the fewest candidates of any problem).

    Every problem needs at least max_k candidates, as in the reference (CodeRM asserts n >= k).
    """
    max_k = _checked_max_k(counts, max_k)
    return [sum(pass_at_k(item.n, item.c, k) for item in counts) / len(counts) for k in range(1, max_k + 1)]


def public_filtered_pass_at_k_curve(counts: Sequence[CodeCounts], max_k: int | None = None) -> list[float]:
    """Mean public-filtered pass@k over problems for k = 1..max_k (default as `pass_at_k_curve`)."""
    max_k = _checked_max_k(counts, max_k)
    return [
        sum(public_filtered_pass_at_k(item.n_public, item.c_public, k) for item in counts) / len(counts)
        for k in range(1, max_k + 1)
    ]


def _checked_max_k(counts: Sequence[CodeCounts], max_k: int | None) -> int:
    if not counts:
        raise ValueError("pass@k needs at least one problem")
    fewest = min(item.n for item in counts)
    if max_k is None:
        max_k = fewest
    if not 1 <= max_k <= fewest:
        raise ValueError(f"max_k={max_k} needs 1 <= max_k <= {fewest}, the fewest candidates of any problem")
    return max_k
