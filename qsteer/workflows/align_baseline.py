"""Make a baseline for Transfer Q*: sample from the policy, rank by the reward, align by DPO (TRL).

Each prompt gets `n` samples from the policy actors (one call) and their rewards (one reward
call); the best and the worst form the prompt's preference pair when their rewards differ by at
least `min_margin`. The trainer actor runs TRL's DPO on the pairs from the policy's weights and
writes `baseline/` into the run folder (a transformers folder with `baseline_card.json` and a
README), then samples `eval_n` completions per prompt from the trained model with the policy's
random streams: sample j of a prompt is drawn from the same stream before and after, so the
card's reward before/after compares the two models on the same prompts and seeds.

It sees the whole dataset at once (a DPO run is one job, not a batch per prompt group). Each
result record holds the prompt's policy samples (`candidates`; `output` is the first, as in
workflow=sample), its pair (`pair`: chosen and rejected indices, or null), the trained model's
first sample (`trained_output`), and the prompt's mean reward before and after.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qsteer.training.baseline import Pair
from qsteer.workflows.common import Choice, Context, Stats, assemble, generate_and_score, score


def run(records: list[dict], ctx: Context) -> list[dict]:
    wf = ctx.workflow
    assert ctx.policy is not None and ctx.baseline_trainer is not None and ctx.out_dir is not None
    stats = Stats()
    completions, errors, scored = generate_and_score(records, ctx, wf.n, stats)
    pairs, chosen_rejected = [], []
    for record, rewards, comps in zip(records, scored, completions, strict=True):
        values = [r for r, _ in rewards]
        ranked = [i for i in range(len(values)) if values[i] is not None]
        pair = None
        if comps and ranked:
            best = max(ranked, key=lambda i: (values[i], -i))
            worst = min(ranked, key=lambda i: (values[i], i))
            if values[best] - values[worst] >= wf.min_margin:
                pair = (best, worst)
                pairs.append(Pair(record.get("messages") or record["prompt"], comps[best].text, comps[worst].text))
        chosen_rejected.append(pair)

    folder = str(Path(ctx.out_dir) / "baseline")
    trained = ctx.baseline_trainer.align_dpo(pairs, folder, {
        "beta": wf.beta, "learning_rate": wf.learning_rate, "epochs": wf.epochs, "batch_size": wf.batch_size,
        "max_length": wf.max_length, "seed": ctx.params.seed})
    ok = [i for i, comps in enumerate(completions) if comps]
    prompt_ids = ctx.policy.encode([records[i].get("messages") or records[i]["prompt"] for i in ok], ctx.chat)
    after_outs = ctx.baseline_trainer.generate(folder, prompt_ids, replace(ctx.params, n=wf.eval_n),
                                      [str(records[i]["id"]) for i in ok])
    after: list[list] = [[] for _ in records]
    for i, comps in zip(ok, after_outs, strict=True):
        after[i] = comps
    after_scored = score(records, [[c.text for c in comps] for comps in after], ctx, stats,
                         [[c.token_ids for c in comps] for comps in after])
    before_rewards = [r for rewards in scored for r, _ in rewards[: wf.eval_n] if r is not None]
    after_rewards = [r for rewards in after_scored for r, _ in rewards if r is not None]
    card = {**trained, "prompts": len(records), "samples_per_prompt": wf.n, "min_margin": wf.min_margin,
            "eval_samples": len(after_rewards), "reward": ctx.reward_name,
            "reward_before": _mean(before_rewards), "reward_after": _mean(after_rewards)}
    ctx.baseline_trainer.write_card(folder, card)

    def choose(position: int, candidates: list[dict]) -> Choice:
        pair = chosen_rejected[position]
        mine = after_scored[position]
        fields = {"pair": None if pair is None else {"chosen": pair[0], "rejected": pair[1]},
                  "baseline_path": folder,
                  "reward_before": _mean([r for r, _ in scored[position][: wf.eval_n] if r is not None]),
                  "reward_after": _mean([r for r, _ in mine if r is not None]),
                  "trained_output": after[position][0].text if after[position] else None}
        return Choice(0, fields, {"dpo_steps": trained["steps"]})

    return assemble(records, completions, errors, scored, stats, choose)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None
