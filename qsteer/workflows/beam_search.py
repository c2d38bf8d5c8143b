"""Step-level beam search (search-and-learn's `beam_search`), each prompt's beams its own.

Per prompt, each step samples `workflow.n` candidate steps from the kept beams (`beam_width` from
each), scores the text so far with the scorer (the reward group by default), and keeps the best
`n / beam_width`; a kept candidate that has finished leaves the search and takes its slot. The
search ends when no kept beam is unfinished; the output is the best finished beam. With
`n = beam_width = 1` it is plain sampling, token for token (same seed, same prompt id). The steps,
streams and scorer are in `workflows/steps.py`.
"""

from __future__ import annotations

from qsteer.workflows.common import Context
from qsteer.workflows.steps import records_of, search


def run(records: list[dict], ctx: Context) -> list[dict]:
    width = ctx.workflow.beam_width
    forest, errors, stats, usage = search(records, ctx, trees=1, keep=ctx.workflow.n // width, beam_width=width)
    finals = [[] if trees is None else [(0, beam) for beam in trees[0].finished] for trees in forest]
    return records_of(records, forest, errors, stats, usage, finals)
