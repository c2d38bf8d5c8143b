"""Verification: which draft tokens the target keeps, so that the output follows the target exactly.

One walk over a draft tree covers every rule the drafters need (notation: `p_tgt` is the
target's processed distribution, `q_drf` the draft's; Leviathan et al. letters):

- `greedy`: follow the child equal to argmax p_tgt; emit argmax p_tgt where none matches.
- `match`: deterministic drafts (lookup, Token Recycling): sample y ~ p_tgt, follow the child
  equal to y, else emit y. This is speculative sampling with a one-hot q (vLLM, HF do the same).
- `rrs`: recursive rejection sampling (Leviathan/Chen for one child; SpecInfer for i.i.d.
  children; RSD for children drawn without replacement): accept x_i with min(1, p_i(x_i)/q_i(x_i)),
  else p_{i+1} = norm(max(p_i - q_i, 0)), and q_{i+1} drops x_i when children were drawn
  without replacement.
- `kseq`: SpecTr's K-SEQ selection over m i.i.d. children with the rho* that balances
  1 - (1 - beta(rho))^m = rho * beta(rho).

Children that share a prefix (k independent chains) are pooled: the "node" the walk stands on
is the set of draft nodes whose paths equal the accepted prefix, and its children are all of
theirs, in draft order. That is what SpecTr's "drafts that agree with the accepted prefix" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RULES = ("greedy", "match", "rrs", "kseq")


@dataclass
class Verdict:
    accepted: list[int]  # draft node indices on the accepted path, root first
    token: int  # the target's own token after them: a residual sample or the bonus
    tested: int = 0  # positions where a draft token was put to the test
    accepted_tested: int = 0  # of those, how many passed
    alpha: list[float] = field(default_factory=list)  # analytic sum(min(p, q)) at each tested position


def draw(probs: torch.Tensor, uniform: float) -> int:
    """Inverse-CDF draw from an unnormalised probability vector."""
    cdf = probs.cumsum(-1)
    index = int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype), right=True))
    return min(index, probs.shape[-1] - 1)


def residual(p_tgt: torch.Tensor, q_drf: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)); p itself when the two (numerically) coincide, where rejection has probability 0."""
    rest = (p_tgt - q_drf).clamp(min=0)
    total = float(rest.sum())
    return rest / total if total > 1e-12 else p_tgt


def kseq_rho(p_tgt: torch.Tensor, q_drf: torch.Tensor, m: int, iters: int = 60) -> float:
    """SpecTr's rho* in [1, m]: the root of f(rho) = 1 - (1 - beta(rho))^m - rho * beta(rho)."""
    if m == 1:
        return 1.0
    p64, q64 = p_tgt.double(), q_drf.double()

    def f(rho: float) -> float:
        beta = float(torch.minimum(q64, p64 / rho).sum())
        return 1 - (1 - beta) ** m - rho * beta

    lo, hi = 1.0, float(m)
    if f(lo) <= 0:
        return lo
    for _ in range(iters):  # f(1) >= 0 >= f(m): bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def kseq_acceptance(p_tgt: torch.Tensor, q_drf: torch.Tensor, m: int) -> float:
    rho = kseq_rho(p_tgt, q_drf, m)
    beta = float(torch.minimum(q_drf.double(), p_tgt.double() / rho).sum())
    return 1 - (1 - beta) ** m


def children_of(parents: list[int]) -> list[list[int]]:
    """children[0] are the root's children; children[i + 1] are node i's, in draft order."""
    out: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        out[parent + 1].append(node)
    return out


def verify_tree(
    p_at,  # callable: column (0 = root, i + 1 = node i) -> processed target probs there (or raw logits for greedy)
    tokens: list[int],
    children: list[list[int]],
    valid: list[bool],
    rule: str,
    uniform,  # callable: () -> float in [0, 1)
    q_at=None,  # callable: node -> the draft distribution that node was drawn from (rrs, kseq)
    without_replacement: bool = False,
) -> Verdict:
    if rule not in RULES:
        raise ValueError(f"verification rule {rule!r} is not one of {RULES}")
    verdict = Verdict(accepted=[], token=-1)
    here = [-1]  # the pooled node: draft nodes whose paths equal the accepted prefix (-1 = root)
    while True:
        kids = [c for h in here for c in children[h + 1] if valid[c]]
        p_tgt = p_at(here[0] + 1)
        if not kids:  # a leaf: the target's next token is a free bonus
            verdict.token = int(p_tgt.argmax()) if rule == "greedy" else draw(p_tgt, uniform())
            return verdict
        if rule in ("greedy", "match"):
            y = int(p_tgt.argmax()) if rule == "greedy" else draw(p_tgt, uniform())
            chosen = [c for c in kids if tokens[c] == y]
            verdict.tested += 1
            verdict.alpha.append(float(p_tgt[tokens[kids[0]]]) if rule == "match" else float(y == tokens[kids[0]]))
        else:
            q_drf = q_at(kids[0])
            verdict.tested += 1
            verdict.alpha.append(float(torch.minimum(p_tgt, q_drf).sum()))
            if rule == "rrs":
                y, chosen = _rrs(p_tgt, q_drf, kids, tokens, uniform, without_replacement)
            else:
                y, chosen = _kseq(p_tgt, q_drf, kids, tokens, uniform)
        if not chosen:
            verdict.token = y
            return verdict
        verdict.accepted_tested += 1
        verdict.accepted.append(chosen[0])
        here = chosen


def _rrs(p_tgt, q_drf, kids, tokens, uniform, without_replacement):
    tried: set[int] = set()
    for child in kids:
        x = tokens[child]
        if x in tried and without_replacement:
            continue
        if uniform() * float(q_drf[x]) < float(p_tgt[x]):  # u < min(1, p/q), without dividing by q = 0
            return x, [c for c in kids if tokens[c] == x]
        p_tgt = residual(p_tgt, q_drf)
        if without_replacement:
            tried.add(x)
            q_drf = q_drf.clone()
            q_drf[x] = 0
            total = float(q_drf.sum())
            q_drf = q_drf / total if total > 0 else q_drf
    return draw(p_tgt, uniform()), []


def _kseq(p_tgt, q_drf, kids, tokens, uniform):
    rho = kseq_rho(p_tgt, q_drf, len(kids))
    for child in kids:
        x = tokens[child]
        if uniform() * rho * float(q_drf[x]) < float(p_tgt[x]):
            return x, [c for c in kids if tokens[c] == x]
    rest = (p_tgt - rho * q_drf).clamp(min=0)
    return draw(rest if float(rest.sum()) > 1e-12 else p_tgt, uniform()), []
