"""Speculative decoding as a run: decode every prompt with the `draft=` group, and plainly beside it.

The plain pass (workflow.baseline) runs on the same prompts, with the same seed and settings, in
the same job, so each record carries the speedup measured against it; at temperature 0 it also
carries whether the two outputs are token-identical, which lossless drafting guarantees.
"""

from __future__ import annotations

import time
from dataclasses import replace

from qsteer.workflows.common import Choice, Context, Stats, assemble, generate, score_completions


def run(records: list[dict], ctx: Context) -> list[dict]:
    if not ctx.params.speculative:
        raise ValueError("workflow=speculative needs a draft (draft=lookup, recycle, layerskip or model)")
    n = ctx.workflow.n
    stats = Stats()
    started = time.perf_counter()
    completions, errors = generate(records, ctx, n, stats)
    spec_wall = time.perf_counter() - started
    plain, plain_wall = [None] * len(records), 0.0
    if ctx.workflow.baseline:
        started = time.perf_counter()
        plain, _ = generate(records, replace(ctx, params=replace(ctx.params, speculative=None)), n, stats)
        plain_wall = time.perf_counter() - started
    scored = score_completions(records, completions, ctx, stats)
    share = len(records)

    def choose(position: int, candidates: list[dict]) -> Choice:
        choice = Choice(stats={"spec_wall_s": round(spec_wall / share, 4)})
        base = plain[position]
        if base is not None:
            choice.stats["plain_wall_s"] = round(plain_wall / share, 4)
            choice.stats["plain_generated_tokens"] = sum(len(c.token_ids) for c in base)
            if ctx.params.temperature == 0:
                choice.fields["identical_to_plain"] = all(
                    a.token_ids == b.token_ids for a, b in zip(completions[position], base, strict=True)
                )
        return choice

    return assemble(records, completions, errors, scored, stats, choose)
