"""Verification kernels on synthetic distributions: lossless, and accepting at the papers' rates.

Reference values are the project notes' derivations (shared/papers/checks/specsamp_check_*.py)
for p = [.5, .3, .15, .05], q = [.1, .2, .3, .4].
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from qsteer.decoding.speculative import children_of, kseq_acceptance, kseq_rho, verify_tree

P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
Q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)


def one_level(rule: str, m: int, without_replacement: bool, samples: int, seed: int, p=P, q=Q):
    """Emitted first token and acceptance over `samples` rounds of m children drawn from q."""
    gen = torch.Generator().manual_seed(seed)
    children = children_of([-1] * m)
    counts = torch.zeros(len(p), dtype=torch.long)
    accepted = 0
    for _ in range(samples):
        kids = torch.multinomial(q, m, replacement=not without_replacement, generator=gen).tolist()
        verdict = verify_tree(
            lambda col: p, kids, children, [True] * m, rule,
            lambda: float(torch.rand((), generator=gen, dtype=torch.float64)),
            lambda node: q, without_replacement,
        )
        first = kids[verdict.accepted[0]] if verdict.accepted else verdict.token
        counts[first] += 1
        accepted += bool(verdict.accepted)
    return counts, accepted / samples


def assert_distribution(counts: torch.Tensor, p: torch.Tensor) -> None:
    n = int(counts.sum())
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
    assert ((counts / n - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all()


@pytest.mark.parametrize(
    ("rule", "m", "without_replacement", "expected"),
    [
        ("rrs", 1, False, 0.5),  # Leviathan / Chen: sum(min(p, q))
        ("rrs", 2, False, 0.65),  # SpecInfer, i.i.d. children
        ("rrs", 3, False, 0.685),
        ("rrs", 2, True, 0.6798),  # RSD, children without replacement
        ("rrs", 3, True, 0.7809),
        ("kseq", 2, False, 0.6584),  # SpecTr K-SEQ
        ("kseq", 3, False, 0.71),
        ("kseq", 4, False, 0.7547),
    ],
)
def test_verification_is_lossless_and_accepts_at_the_analytic_rate(rule, m, without_replacement, expected):
    samples = 8000  # 4-sigma bands of +-0.02 around the rates; the negative control below uses 20000
    counts, acceptance = one_level(rule, m, without_replacement, samples, seed=m)
    assert_distribution(counts, P)
    assert abs(acceptance - expected) < 4 * (expected * (1 - expected) / samples) ** 0.5 + 1e-3


def test_kseq_rho_and_acceptance_match_the_derived_values():
    for m, rho, acceptance in [(2, 1.5844, 0.6584), (3, 2.1, 0.71), (4, 2.5475, 0.7547)]:
        assert kseq_rho(P, Q, m) == pytest.approx(rho, abs=1e-3)
        assert kseq_acceptance(P, Q, m) == pytest.approx(acceptance, abs=1e-3)
    assert kseq_rho(P, Q, 1) == 1.0
    assert kseq_acceptance(P, Q, 1) == pytest.approx(float(torch.minimum(P, Q).sum()))


def test_match_rule_accepts_a_deterministic_draft_with_probability_p_of_it():
    gen = torch.Generator().manual_seed(0)
    samples, hits = 20000, 0
    counts = torch.zeros(4, dtype=torch.long)
    for _ in range(samples):
        verdict = verify_tree(lambda col: P, [2], children_of([-1]), [True], "match",
                              lambda: float(torch.rand((), generator=gen, dtype=torch.float64)))
        hits += bool(verdict.accepted)
        counts[2 if verdict.accepted else verdict.token] += 1
    assert abs(hits / samples - 0.15) < 4 * (0.15 * 0.85 / samples) ** 0.5
    assert_distribution(counts, P)


def test_the_chi_square_check_rejects_a_wrong_residual():
    """Negative control: resampling from p instead of norm(max(p - q, 0)) after a rejection is biased,
    and the same check that passes the real kernel must catch it."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, dtype=torch.long)
    for _ in range(20000):
        x = int(torch.multinomial(Q, 1, generator=gen))
        if float(torch.rand((), generator=gen)) < min(1.0, float(P[x] / Q[x])):
            counts[x] += 1
        else:
            counts[int(torch.multinomial(P, 1, generator=gen))] += 1
    with pytest.raises(AssertionError):
        assert_distribution(counts, P)


def test_tree_walk_follows_the_accepted_path_and_pools_equal_prefixes():
    # two chains [7, 8] and [7, 9]: after accepting 7 the walk stands on both nodes at once
    parents = [-1, 0, -1, 2]
    tokens = [7, 8, 7, 9]
    logits = {0: 7, 1: 9, 2: 9, 3: 1, 4: 5}  # column -> argmax token

    def p_at(col):
        out = torch.zeros(10)
        out[logits[col]] = 1.0
        return out

    verdict = verify_tree(p_at, tokens, children_of(parents), [True] * 4, "greedy", lambda: 0.5)
    assert [tokens[n] for n in verdict.accepted] == [7, 9]
    assert verdict.token == 5  # the bonus after node 3 (column 4)
    invalid = verify_tree(p_at, tokens, children_of(parents), [True, True, False, False], "greedy", lambda: 0.5)
    assert [tokens[n] for n in invalid.accepted] == [7] and invalid.token == 9
