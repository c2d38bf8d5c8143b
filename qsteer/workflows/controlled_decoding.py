"""Controlled decoding (Mudgal et al., 2023): steer the frozen policy by a prefix value, token- or block-wise.

`workflow.mode`:
- `tokenwise`: every token from p(z|s) exp(alpha V([s, z])) / Z over the policy's top-k, in the
  policy actors (`PolicyGroup.generate_guided`: a Q-head on the policy's backbone scores from the
  loop's own forward; value actors are called once per step for all rows). The record's `kl` is
  the exact sum of the per-step KLs from the top-k base (the law alpha = 0 samples); `kl_full`
  is the same from the whole-vocabulary base.
- `blockwise`: repeat until the answer ends: sample K = `workflow.n` blocks of M =
  `workflow.block_size` tokens from the policy (one call for every unfinished prompt of the
  batch), score each candidate prefix with the value (`ctx.value.values`; a finished candidate by
  the reward when `workflow.score_finished`), keep the best (ties: the earliest), repeat. A block's
  tokens continue the row's random stream where the answer so far ends (`SamplingParams.offset`),
  so K = 1 is plain sampling token for token, and with M >= the budget and the reward as scorer
  the one round is Best-of-K, bit for bit. The record's `kl` is blocks x (log K - (K-1)/K), the
  Best-of-K bound per block with the chain rule: a bound (`kl_is_bound: true`), not a measurement.

Every record carries the calls and tokens of each role in its `stats`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from qsteer.engines import Completion
from qsteer.values.guided import best_of_k_kl_bound
from qsteer.workflows.common import Choice, Context, Stats, assemble, encode, score, score_completions


def run(records: list[dict], ctx: Context) -> list[dict]:
    if ctx.workflow.mode == "tokenwise":
        return tokenwise(records, ctx)
    return blockwise(records, ctx)


# -- tokenwise ----------------------------------------------------------------------------------------


def tokenwise(records: list[dict], ctx: Context) -> list[dict]:
    stats = Stats()
    prompt_ids, errors = encode(records, ctx)
    ok = [i for i, err in enumerate(errors) if err is None]
    completions: list[list[Completion] | None] = [None] * len(records)
    if ok:
        params = replace(ctx.params, n=1, top_k=ctx.workflow.top_k)
        outs = ctx.policy.generate_guided([prompt_ids[i] for i in ok], params,
                                          [str(records[i]["id"]) for i in ok], ctx.workflow.alpha)
        stats.policy_calls += 2  # encode, generate_guided
        for i, comps in zip(ok, outs, strict=True):
            completions[i] = comps
            stats.prompt_tokens[str(records[i]["id"])] = len(prompt_ids[i])
    scored = score_completions(records, completions, ctx, stats)

    def choose(position: int, candidates: list[dict]) -> Choice:
        guided = completions[position][0].guided
        return Choice(
            fields={"kl": guided["kl"], "kl_full": guided["kl_full"], "kl_is_bound": False,
                    "alpha": ctx.workflow.alpha},
            stats={"value_calls": round(guided["scorer_calls"], 4),
                   "value_scored_candidates": guided["scored_candidates"],
                   "policy_forwards": round(guided["policy_forwards"], 4)},
        )

    return assemble(records, completions, errors, scored, stats, choose)


# -- blockwise ----------------------------------------------------------------------------------------


def blockwise(records: list[dict], ctx: Context) -> list[dict]:
    k, m, budget = ctx.workflow.n, ctx.workflow.block_size, ctx.params.max_new_tokens
    stats = Stats()
    prompt_ids, errors = encode(records, ctx)
    stats.policy_calls += 1
    ok = [i for i, err in enumerate(errors) if err is None]
    for i in ok:
        stats.prompt_tokens[str(records[i]["id"])] = len(prompt_ids[i])
    answers: dict[int, list[int]] = {i: [] for i in ok}  # the answer so far, per record
    logprobs: dict[int, list[float]] = {i: [] for i in ok}
    finish: dict[int, str] = {}
    rounds: dict[int, list[dict[str, Any]]] = {i: [] for i in ok}
    sampled = dict.fromkeys(ok, 0)  # tokens generated for the record, kept or not
    value_prefixes = dict.fromkeys(ok, 0)
    last: dict[int, Completion] = {}
    active = list(ok)
    while active:
        offset = len(answers[active[0]])  # every unfinished answer holds whole blocks: the same length
        params = replace(ctx.params, n=k, max_new_tokens=min(m, budget - offset), offset=offset)
        blocks = ctx.policy.generate([prompt_ids[i] + answers[i] for i in active], params,
                                     [str(records[i]["id"]) for i in active])
        stats.policy_calls += 1
        values = _block_values(records, active, prompt_ids, answers, blocks, ctx, stats, budget)
        still = []
        for i, cands, vals in zip(active, blocks, values, strict=True):
            best = max(range(len(cands)), key=lambda j: (vals[j], -j))
            block = cands[best]
            answers[i] += block.token_ids
            logprobs[i] += block.logprobs
            sampled[i] += sum(len(c.token_ids) for c in cands)
            value_prefixes[i] += sum(1 for c in cands if not _finished(c, offset, budget) or not ctx.workflow.score_finished)
            rounds[i].append({"values": vals, "chosen": best, "tokens": [len(c.token_ids) for c in cands]})
            last[i] = block
            if _finished(block, offset, budget):
                finish[i] = block.finish_reason
            else:
                still.append(i)
        active = still
    completions: list[list[Completion] | None] = [None] * len(records)
    texts = ctx.policy.decode([answers[i] for i in ok]) if ok else []
    stats.policy_calls += 1 if ok else 0
    for i, text in zip(ok, texts, strict=True):
        text = _cut(text, ctx.params.stop) if finish[i] == "stop" else text
        completions[i] = [Completion(answers[i], text, logprobs[i], finish[i])]
    scored = score_completions(records, completions, ctx, stats)
    bound = best_of_k_kl_bound(k)

    def choose(position: int, candidates: list[dict]) -> Choice:
        blocks_used = len(rounds[position])
        return Choice(
            fields={"kl": blocks_used * bound, "kl_is_bound": True, "blocks": rounds[position]},
            stats={"value_calls": round(stats.value_calls / len(ok), 4) if ok else 0,
                   "value_scored_prefixes": value_prefixes[position], "sampled_tokens": sampled[position]},
        )

    return assemble(records, completions, errors, scored, stats, choose)


def _finished(block: Completion, offset: int, budget: int) -> bool:
    """A block ends the answer at EOS or a stop string, or when the answer has used its budget."""
    return block.finish_reason == "stop" or offset + len(block.token_ids) >= budget


def _block_values(records: list[dict], active: list[int], prompt_ids: list[list[int]], answers: dict[int, list[int]],
                  blocks: list[list[Completion]], ctx: Context, stats: Stats, budget: int) -> list[list[float]]:
    """Each candidate's score: the value of [prompt, answer, block], or the reward of a finished candidate
    when `workflow.score_finished` (one value call and at most one reward call for the whole round)."""
    offset = len(answers[active[0]])
    by_reward = [[ctx.workflow.score_finished and _finished(c, offset, budget) for c in cands] for cands in blocks]
    out = [[0.0] * len(cands) for cands in blocks]
    prefixes, where = [], []
    for row, (i, cands) in enumerate(zip(active, blocks, strict=True)):
        for j, c in enumerate(cands):
            if not by_reward[row][j]:
                prefixes.append(prompt_ids[i] + answers[i] + c.token_ids)
                where.append((row, j))
    if prefixes:
        if ctx.value is None:
            raise ValueError("blockwise controlled decoding scores unfinished blocks with a value: set value.path")
        for (row, j), v in zip(where, ctx.value.values(prefixes), strict=True):
            out[row][j] = v
        stats.value_calls += 1
    if any(any(flags) for flags in by_reward):
        ids = [[answers[i] + c.token_ids if by_reward[row][j] else None for j, c in enumerate(cands)]
               for row, (i, cands) in enumerate(zip(active, blocks, strict=True))]
        texts = _texts(ctx, [[c.text if not answers[i] else None for c in cands] for i, cands in zip(active, blocks,
                                                                                                     strict=True)],
                       ids, [[c.finish_reason for c in cands] for cands in blocks])
        rows = [[t for t in group if t is not None] for group in texts]
        row_ids = [[x for x in group if x is not None] for group in ids]
        rewards = score([records[i] for i in active], rows, ctx, stats, row_ids)
        for row, group in enumerate(texts):
            got = iter(rewards[row])
            for j, t in enumerate(group):
                if t is not None:
                    reward, _ = next(got)
                    out[row][j] = -math.inf if reward is None else reward
    return out


def _texts(ctx: Context, own: list[list[str | None]], ids: list[list[list[int] | None]],
           reasons: list[list[str]]) -> list[list[str | None]]:
    """The text of each finished candidate (ids not None): its block's own text when the block is the whole
    answer (`own`), else the whole answer decoded in one policy call and cut before its first stop string."""
    need = [(row, j) for row, group in enumerate(ids) for j, x in enumerate(group) if x is not None
            and own[row][j] is None]
    decoded = iter(ctx.policy.decode([ids[row][j] for row, j in need])) if need else iter(())
    out: list[list[str | None]] = [[None] * len(group) for group in ids]
    for row, group in enumerate(ids):
        for j, x in enumerate(group):
            if x is None:
                continue
            if own[row][j] is not None:
                out[row][j] = own[row][j]
                continue
            out[row][j] = _cut(next(decoded), ctx.params.stop) if reasons[row][j] == "stop" else next(decoded)
    return out


def _cut(text: str, stop: list[str]) -> str:
    """The text before its first stop string (the stop rule's cut, on a text decoded whole)."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text
