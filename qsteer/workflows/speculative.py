"""Speculative decoding as a run: decode every prompt with the `draft=` group, and plainly beside it.

The plain pass (workflow.baseline) runs on the same prompts, with the same seed and settings, in
the same job, so each record carries the speedup measured against it; at temperature 0 it also
carries whether the two outputs are token-identical, which lossless drafting guarantees.
"""

from __future__ import annotations

import time
from dataclasses import replace

from qsteer.workflows.common import (
    Context,
    Stats,
    candidate,
    generate,
    record_stats,
    result,
    reward_error,
    score_completions,
)


def run(records: list[dict], ctx: Context) -> list[dict]:
    if not ctx.params.speculative:
        raise ValueError("workflow=speculative needs a draft (draft=lookup, recycle, layerskip or model)")
    n = int(ctx.workflow.get("n", 1))
    stats = Stats()
    started = time.perf_counter()
    completions, errors = generate(records, ctx, n, stats)
    spec_wall = time.perf_counter() - started
    plain, plain_wall = [None] * len(records), None
    if ctx.workflow.get("baseline", True):
        started = time.perf_counter()
        plain, _ = generate(records, replace(ctx, params=replace(ctx.params, speculative=None)), n, stats)
        plain_wall = time.perf_counter() - started
    scored = score_completions(records, completions, ctx, stats)

    out = []
    share = len(records)
    for record, comps, base, err, rewards in zip(records, completions, plain, errors, scored, strict=True):
        row_stats = record_stats(stats, share, comps, record["id"])
        if comps is None:
            out.append(result(record, None, None, [], row_stats, err))
            continue
        row_stats["spec_wall_s"] = round(spec_wall / share, 4)
        extra = {}
        if base is not None:
            row_stats["plain_wall_s"] = round(plain_wall / share, 4)
            row_stats["plain_generated_tokens"] = sum(len(c.token_ids) for c in base)
            if ctx.params.temperature == 0:
                extra["identical_to_plain"] = all(a.token_ids == b.token_ids for a, b in zip(comps, base, strict=True))
        cands = [candidate(c.text, r, info, c) for c, (r, info) in zip(comps, rewards, strict=True)]
        out.append(result(record, comps[0].text, rewards[0][0], cands, row_stats, reward_error(rewards[:1]), **extra))
    return out

