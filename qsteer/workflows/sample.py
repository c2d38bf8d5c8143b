"""Plain sampling, the baseline: `workflow.n` samples per prompt; the first is the output."""

from __future__ import annotations

from qsteer.workflows.common import Context, Stats, assemble, generate_and_score


def run(records: list[dict], ctx: Context) -> list[dict]:
    stats = Stats()
    completions, errors, scored = generate_and_score(records, ctx, ctx.workflow.n, stats)
    return assemble(records, completions, errors, scored, stats)
