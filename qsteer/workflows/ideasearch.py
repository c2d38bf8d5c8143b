"""IdeaSearch (PlanSearch's second baseline): a plain-language sketch, then a program that follows it.

Two stages, each one batched call: `workflow.n` sketches per problem (after two worked
sketches), then one program per sketch. The same accounting as repeated sampling and
PlanSearch: `n` programs per problem, judged in the sandbox group (`code_search`).
"""

from __future__ import annotations

from qsteer.workflows.code_search import CodeRun
from qsteer.workflows.common import Context
from qsteer.workflows.plansearch_prompts import code_from_sketch, idea_sketch, problem_of


def run(records: list[dict], ctx: Context) -> list[dict]:
    n = ctx.workflow.n
    job = CodeRun(records, ctx)
    problems = [problem_of(r) for r in records]
    job.stage("sketch", lambda i, state: [(idea_sketch(problems[i]), "0")], n=n)  # n samples share a prefill
    job.stage("code", lambda i, state: [
        (code_from_sketch(problems[i], state["sketch"][j]), str(j)) for j in range(n)
    ])
    return job.records_out("code")
