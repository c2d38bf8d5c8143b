"""Diverse Verifier Tree Search (search-and-learn's `dvts`): the budget split into independent subtrees.

Per prompt, `workflow.n / beam_width` subtrees each grow one beam: every step a subtree samples
`beam_width` candidate steps from its beam, scores them (the reward group by default), and keeps
the best; the subtree ends when that best candidate has finished. Subtrees never compare with one
another until the end, which keeps their paths apart (the diversity DVTS is named for); the output
is the best subtree's beam, and every subtree's beam is a candidate. One subtree is beam search
with `n = beam_width` (one kept beam), bit for bit. The steps, streams and scorer are in
`workflows/steps.py`.
"""

from __future__ import annotations

from qsteer.workflows.common import Context
from qsteer.workflows.steps import records_of, search


def run(records: list[dict], ctx: Context) -> list[dict]:
    width = ctx.workflow.beam_width
    forest, errors, stats, usage = search(records, ctx, trees=ctx.workflow.n // width, keep=1, beam_width=width)
    finals = [[] if trees is None else [(tree.index, beam) for tree in trees for beam in tree.finished]
              for trees in forest]
    return records_of(records, forest, errors, stats, usage, finals)
