"""Speculative decoding: a drafter proposes, the target verifies, and the output stays the target's.

Read top to bottom. One round: the drafter proposes a tree per row (a chain is a thin tree);
the target runs once over [last token, tree nodes] with a tree mask (`forward_chunk`);
`verify_tree` walks each row's tree with the row's own uniforms; accepted nodes' cache columns
stay valid, the rest become holes (`qsteer.lm.cache`). The first token of a row comes from the
prefill, as in gpt-fast. Rows keep their own random streams, so a row's output does not depend
on which other rows share its batch (up to floating-point reduction order).

The drafter is an argument (the `Drafter` protocol), as gpt-fast passes its draft model to
`speculative_decode`: this module knows no drafter and no Ray.

Verification, one walk over a draft tree for every rule (`p_tgt` is the target's processed
distribution, `q_drf` the draft's; Leviathan et al. letters):

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

import numpy as np
import torch

from qsteer.decoding.drafters.base import Batch, Drafter
from qsteer.lm.cache import compact
from qsteer.lm.forward import ancestors, forward_chunk, prefill_shared
from qsteer.lm.loading import LanguageModel, many_small_rows
from qsteer.lm.sampling import SamplingParams, draw, processed, row_generator, uniform_from
from qsteer.lm.stop import Completion

RULES = ("greedy", "match", "rrs", "kseq")


# -- the loop ------------------------------------------------------------------------------------


def _spec_stats() -> dict:
    return {"rounds": 0, "drafted": 0, "accepted": 0, "tested": 0, "alpha_sum": 0.0, "draft_calls": 0,
            "target_calls": 1, "emitted": 0}


@torch.inference_mode()
def generate_rows(lm: LanguageModel, drafter: Drafter, prompt_ids: list[list[int]], keys: list[str],
                  rows: list[tuple[int, int]], params: SamplingParams) -> list[Completion]:
    """Decode `rows` ((prompt index, sample index) pairs) in one batch, drafting with `drafter`."""
    with many_small_rows(lm.model):
        return _generate_rows(lm, drafter, prompt_ids, keys, rows, params)


def _generate_rows(lm: LanguageModel, drafter: Drafter, prompt_ids: list[list[int]], keys: list[str],
                   rows: list[tuple[int, int]], params: SamplingParams) -> list[Completion]:
    model, device = lm.model, lm.device
    unique = sorted({p for p, _ in rows})
    slot = {p: i for i, p in enumerate(unique)}
    headroom = params.max_new_tokens + 2 * (drafter.max_nodes + 1) + 64
    cache, first_logits, mask, _ = prefill_shared(
        model, [prompt_ids[p] for p in unique], [slot[p] for p, _ in rows], lm.pad_id, device, headroom
    )
    capacity = mask.shape[1] + headroom

    uniforms = [uniform_from(row_generator(params.seed, keys[p], j)) for p, j in rows]
    greedy = params.temperature == 0
    rule = "greedy" if greedy else drafter.rule
    stop = lm.stop_rule(params.stop)
    budget = [lm.budget(len(prompt_ids[p]), params.max_new_tokens) for p, _ in rows]

    outputs: list[list[int]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    finish = ["length"] * len(rows)
    stats = [_spec_stats() for _ in rows]

    def emit(row: int, token: int, logprob: float) -> bool:
        """Append one token; False once the row is done."""
        outputs[row].append(token)
        logprobs[row].append(logprob)
        reason = stop.reason(outputs[row], budget[row])
        if reason is not None:
            finish[row] = reason
        return reason is None

    raw_first = torch.log_softmax(first_logits, dim=-1)
    p_first = first_logits if greedy else processed(first_logits, params)
    alive = []  # per batch slot: still generating
    for r in range(len(rows)):
        token = int(p_first[r].argmax()) if greedy else draw(p_first[r], uniforms[r]())
        alive.append(emit(r, token, float(raw_first[r, token])))

    batch = Batch(
        history=[list(prompt_ids[p]) + outputs[r] for r, (p, _) in enumerate(rows)],
        keys=[(keys[p], j) for p, j in rows],
        params=params,
        cache=cache,
        valid=mask.bool(),
        pos=torch.tensor([len(prompt_ids[p]) for p, _ in rows], device=device),
    )
    live = list(range(len(rows)))  # which row each batch slot holds
    drafting = any(alive)
    if drafting:
        drafter.begin(batch)
    while any(alive):
        # finished rows ride along until a quarter of the batch has finished, then the batch shrinks
        if alive.count(False) * 4 >= len(alive):
            keep = torch.tensor([i for i, a in enumerate(alive) if a])
            cache.batch_select_indices(keep.to(device))
            batch.valid, batch.pos = batch.valid[keep.to(device)], batch.pos[keep.to(device)]
            batch.history = [batch.history[i] for i in keep.tolist()]
            batch.keys = [batch.keys[i] for i in keep.tolist()]
            live = [live[i] for i in keep.tolist()]
            alive = [True] * len(live)
            drafter.select(keep)
        if batch.valid.shape[1] + 2 * (drafter.max_nodes + 1) > capacity:
            batch.valid = compact(cache, batch.valid)

        draft = drafter.propose(batch)
        draft.root = batch.last
        nodes = draft.tokens.shape[1]
        depth = torch.tensor([0] + [d + 1 for d in draft.depths], device=device)
        chunk = torch.cat([draft.root[:, None], draft.tokens.to(device)], dim=-1)
        logits = forward_chunk(model, cache, batch.valid, chunk, batch.pos[:, None] + depth, ancestors(draft.parents))
        children = children_of(draft.parents)
        kept = torch.zeros((len(live), nodes + 1), dtype=torch.bool)
        kept[:, 0] = True
        advance = torch.zeros(len(live), dtype=torch.long)
        for slot_index, row in enumerate(live):
            if not alive[slot_index]:
                continue
            row_logits = logits[slot_index]
            cache_p: dict[int, torch.Tensor] = {}

            def p_at(col: int, row_logits=row_logits, cache_p=cache_p) -> torch.Tensor:
                if col not in cache_p:
                    cache_p[col] = row_logits[col] if greedy else processed(row_logits[col][None], params)[0]
                return cache_p[col]

            q = draft.q[slot_index] if draft.q is not None else None
            verdict = verify_tree(
                p_at, draft.tokens[slot_index].tolist(), children, draft.valid[slot_index].tolist(), rule,
                uniforms[row], (lambda node, q=q: q[node]) if q is not None else None, draft.without_replacement,
            )
            path_cols = [0] + [n + 1 for n in verdict.accepted]
            raw = torch.log_softmax(row_logits[path_cols], dim=-1)
            emitted = [int(draft.tokens[slot_index, n]) for n in verdict.accepted] + [verdict.token]
            s = stats[row]
            s["rounds"] += 1
            s["target_calls"] += 1
            s["draft_calls"] += draft.calls
            s["drafted"] += int(draft.valid[slot_index].sum())
            s["accepted"] += len(verdict.accepted)
            s["tested"] += verdict.tested
            s["alpha_sum"] += sum(verdict.alpha)
            for i, token in enumerate(emitted):
                s["emitted"] += 1
                if not emit(row, token, float(raw[i, token])):
                    alive[slot_index] = False
                    break
            kept[slot_index, [n + 1 for n in verdict.accepted]] = True
            advance[slot_index] = len(emitted)
            batch.history[slot_index] = batch.history[slot_index] + emitted
        batch.valid = torch.cat([batch.valid, kept.to(device)], dim=-1)
        batch.pos = batch.pos + advance.to(device)
        drafter.observe(batch, draft, logits)
    if drafting:
        drafter.finish()
    return [stop.completion(outputs[r], logprobs[r], finish[r], spec=stats[r]) for r in range(len(rows))]


# -- verification --------------------------------------------------------------------------------


@dataclass
class Verdict:
    accepted: list[int]  # draft node indices on the accepted path, root first
    token: int  # the target's own token after them: a residual sample or the bonus
    tested: int = 0  # positions where a draft token was put to the test
    accepted_tested: int = 0  # of those, how many passed
    alpha: list[float] = field(default_factory=list)  # analytic sum(min(p, q)) at each tested position


def residual(p_tgt: torch.Tensor, q_drf: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)); p itself when the two (numerically) coincide, where rejection has probability 0."""
    rest = (p_tgt - q_drf).clamp(min=0)
    total = float(rest.sum())
    return rest / total if total > 1e-12 else p_tgt


def kseq_rho(p_tgt: torch.Tensor, q_drf: torch.Tensor, m: int, iters: int = 60) -> float:
    """SpecTr's rho* in [1, m]: the root of f(rho) = 1 - (1 - beta(rho))^m - rho * beta(rho)."""
    if m == 1:
        return 1.0
    # numpy, not torch: sixty bisection steps of tiny vector sums are dominated by per-call overhead
    p64, q64 = p_tgt.double().cpu().numpy(), q_drf.double().cpu().numpy()

    def f(rho: float) -> float:
        beta = float(np.minimum(q64, p64 / rho).sum())
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
