"""Plain sampling, the baseline: `workflow.n` samples per prompt; the first is the output."""

from __future__ import annotations

from qsteer.workflows.common import (
    Context,
    Stats,
    candidate,
    generate_and_score,
    record_stats,
    result,
    reward_error,
)


def run(records: list[dict], ctx: Context) -> list[dict]:
    stats = Stats()
    completions, errors, scored = generate_and_score(records, ctx, int(ctx.workflow.get("n", 1)), stats)
    out = []
    for record, comps, err, rewards in zip(records, completions, errors, scored, strict=True):
        if comps is None:
            out.append(result(record, None, None, [], record_stats(stats, len(records), None, record["id"]), err))
            continue
        cands = [candidate(c.text, r, info, c) for c, (r, info) in zip(comps, rewards, strict=True)]
        out.append(
            result(record, comps[0].text, rewards[0][0], cands, record_stats(stats, len(records), comps, record["id"]),
                   reward_error(rewards[:1]))
        )
    return out
