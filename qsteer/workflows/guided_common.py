"""What the token-wise guided workflows share (Transfer Q*, ARGS): run the guided loop with a scorer
over a batch, score the outputs in one reward call, and write each record's KL and compute.

The loop runs inside one replica of the role that gives the logits (`loop`: the policy, or the
baseline for Transfer Q* with `logit_model=baseline`); the scorer, built here per batch, reaches
the other roles from there. Each record gets, beside the common fields:

- `kl`, `kl_full`: the output's summed exact per-step KL(pi_alpha || p_k) from the logit model's
  top-k law (and from its full law), as `decoding.guided` records them. In greedy mode the tokens
  are the argmax of that law, and the KL is still the soft law's (labelled `kl_of: "guided law"`).
- `stats`: `reference_forwards` (forwards of the loop's model), `baseline_calls`,
  `baseline_tokens` (rollout tokens generated), `scorer_reward_calls` and `rewarded_texts`
  (texts the reward scored for the scorer), summed over the record's completions; a call shared
  by the rows of a batch counts for each row in proportion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from qsteer.actors.roles import PolicyRole
from qsteer.actors.scorers import PromptInfo
from qsteer.data import prompt_text
from qsteer.engines import Completion, SamplingParams
from qsteer.workflows.common import Choice, Context, Stats, assemble, columns_of, encode, score_completions

COST_KEYS = ("baseline_calls", "baseline_tokens", "rollouts", "scorer_reward_calls", "rewarded_texts")


def run_guided(records: list[dict], ctx: Context, loop: PolicyRole, make_scorer: Callable[[dict], Any],
               alpha: float, params: SamplingParams, method: dict[str, Any]) -> list[dict]:
    """Guided completions of every record, scored and assembled; `method` goes into each record."""
    stats = Stats()
    prompt_ids, errors = encode(records, ctx, loop)
    ok = [i for i, err in enumerate(errors) if err is None]
    completions: list[list[Completion] | None] = [None] * len(records)
    if ok:
        keys = [str(records[i]["id"]) for i in ok]
        infos = {key: PromptInfo(len(prompt_ids[i]), prompt_text(records[i]), columns_of(records[i]))
                 for key, i in zip(keys, ok, strict=True)}
        outs = loop.generate_guided([prompt_ids[i] for i in ok], params, keys, alpha, scorer=make_scorer(infos))
        stats.policy_calls += 1
        for i, comps in zip(ok, outs, strict=True):
            completions[i] = comps
            stats.prompt_tokens[str(records[i]["id"])] = len(prompt_ids[i])
    scored = score_completions(records, completions, ctx, stats)

    def choose(position: int, candidates: list[dict]) -> Choice:
        comps = completions[position] or []
        guided = [c.guided or {} for c in comps]
        costs = {"reference_forwards": round(sum(g.get("policy_forwards", 0.0) for g in guided), 4)}
        for name in COST_KEYS:
            source = {"baseline_tokens": "rollout_tokens", "scorer_reward_calls": "reward_calls"}.get(name, name)
            costs[name] = round(sum(g.get(source, 0.0) for g in guided), 4)
        first = guided[0] if guided else {}
        return Choice(0, {"kl": first.get("kl"), "kl_full": first.get("kl_full"), "kl_of": "guided law",
                          **method}, costs)

    return assemble(records, completions, errors, scored, stats, choose)


def guided_params(ctx: Context, top_k: int, greedy: bool, n: int) -> SamplingParams:
    """The loop's sampling: the top-k candidates; greedy is temperature 0 (argmax of the score)."""
    return replace(ctx.params, n=n, top_k=top_k, top_p=1.0, temperature=0.0 if greedy else ctx.params.temperature)
