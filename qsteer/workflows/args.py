"""ARGS (Khanov et al., 2024): score each of the top-k candidates by log p(z|s) + alpha r([s, z]), the reward
of the partial text, and take the argmax (ARGS-greedy) or sample the softmax (ARGS-stochastic).

The cheap baseline of both the controlled-decoding and the Transfer Q* papers, in the same guided
loop: one reward call per step for all rows' candidates. alpha (the reference's weight w) = 0 is
the policy's greedy decoding or top-k sampling. Unlike the reference, which reuses the policy's KV
cache inside a reward model sharing its tokenizer, any reward works here: it gets text.
"""

from __future__ import annotations

from qsteer.actors.scorers import ArgsScorer
from qsteer.workflows.common import Context
from qsteer.workflows.guided_common import guided_params, run_guided


def run(records: list[dict], ctx: Context) -> list[dict]:
    wf = ctx.workflow
    assert ctx.policy is not None and ctx.reward is not None
    return run_guided(records, ctx, ctx.policy, lambda prompts: ArgsScorer(prompts, ctx.reward), wf.alpha,
                      guided_params(ctx, wf.top_k, wf.greedy, wf.n), {})
