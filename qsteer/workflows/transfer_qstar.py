"""Transfer Q* (Chakraborty et al., 2024): decode pi(z|s) exp(alpha Q*(s, z)) over the top-k, with Q*
estimated from an aligned baseline's rollouts (spec section 3; docs/tqstar.md).

Per step of the guided loop, every running row's k candidates get m rollouts of L tokens from the
`baseline=` actors, all in one call, and their texts go to the reward actors in one call (and to
the `baseline.reward` actors for indirect transfer); `values.transfer_qstar` turns them into Q*.
`logit_model=policy` (the paper) runs the loop on the policy, `baseline` (the reference code) on
the baseline, which then rolls out in the same actor. alpha = 0 is the logit model's own greedy
decoding (`greedy: true`, the reference's default) or top-k sampling.
"""

from __future__ import annotations

from qsteer.actors.scorers import TransferQStarScorer
from qsteer.workflows.common import Context
from qsteer.workflows.guided_common import guided_params, run_guided


def run(records: list[dict], ctx: Context) -> list[dict]:
    wf = ctx.workflow
    on_baseline = wf.logit_model == "baseline"
    loop = ctx.baseline if on_baseline else ctx.policy
    assert loop is not None and ctx.reward is not None

    def make_scorer(prompts: dict) -> TransferQStarScorer:
        return TransferQStarScorer(
            prompts, ctx.reward, None if on_baseline else ctx.baseline, ctx.baseline_reward,
            rollout_tokens=wf.rollout_tokens, rollouts=wf.rollouts, rollout_sampling=wf.rollout_sampling,
            transfer=wf.transfer, estimator=wf.estimator, beta=wf.beta, seed=ctx.params.seed,
        )

    method = {"transfer": wf.transfer, "estimator": wf.estimator if wf.transfer == "indirect" else "direct mean",
              "logit_model": wf.logit_model}
    if wf.transfer == "indirect" and wf.estimator == "reference":
        method["estimator_note"] = "the reference code's unnormalised score w*r: biased between candidates"
    return run_guided(records, ctx, loop, make_scorer, wf.alpha, guided_params(ctx, wf.top_k, wf.greedy, wf.n),
                      method)
