"""Repeated sampling for code (PlanSearch's baseline): `workflow.n` programs asked for directly.

One stage: the problem after two worked examples, `n` samples per problem in one batched call
(n samples share the prompt's prefill). Candidates are judged as every code workflow's are
(`code_search`): public tests select, hidden tests score.
"""

from __future__ import annotations

from qsteer.workflows.code_search import CodeRun
from qsteer.workflows.common import Context
from qsteer.workflows.plansearch_prompts import problem_of, repeated_sampling


def run(records: list[dict], ctx: Context) -> list[dict]:
    job = CodeRun(records, ctx)
    problems = [problem_of(r) for r in records]
    job.stage("code", lambda i, state: [(repeated_sampling(problems[i]), "0")], n=ctx.workflow.n)
    return job.records_out("code")
