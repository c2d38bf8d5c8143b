"""`workflow=ctrl_align`: InfAlign's CTRL end to end, with the actors doing what the trainer does not.

1. Reference scores: with `reward=calibrated`, every training prompt's M reference samples come
   from the policy actors (the reference) and are scored by the reward actors, in one call each
   before training (`CalibratedRewardGroup.prepare`; cached on disk).
2. RL: TRL's RLOOTrainer on the policy's weights (`training.ctrl.train`; k1 KL in the reward,
   beta = `workflow.beta`), its reward function the run's reward role (the transformed calibrated
   reward, or any raw reward for the uncalibrated baseline), called through the reward actors.
   Generation during training is the trainer's own.
3. Saving: `model/` in the run folder, a transformers folder with `training_card.json`,
   `README.md` and `training_curves.png`; `model.path=<run>/model` loads it in any workflow.
4. Evaluation: the trained model (in this process, on the hf engine) against the reference
   actors with `workflow.win_rate.evaluate`: `eval_samples` per side per prompt, win rates
   under plain sampling and Best-of-N for each N in `eval_n` (the summary's
   `metrics.win_rate_sample`, `win_rate_bon4`, ... with intervals), judged by the base reward,
   the mean calibrated reward of both sides, and unbiased per-sequence KL (k1 and k3) from fresh
   samples. One record per training prompt: the evaluation is in-sample.

All prompts go to the trainer in one call (`whole_dataset`); records are written after the
evaluation, so an interrupted run trains again when resumed.
"""

from __future__ import annotations

import time
from typing import Any

from qsteer.actors.local import local_policy
from qsteer.data import prompt_text
from qsteer.training.ctrl import KL_ESTIMATOR, CtrlSettings, train, trained_engine
from qsteer.workflows.common import Context, Stats, score
from qsteer.workflows.win_rate import evaluate


def run(records: list[dict], ctx: Context) -> list[dict]:
    w = ctx.workflow
    assert ctx.policy is not None and ctx.reward is not None and ctx.out_dir is not None
    if not records:
        return []
    stats = Stats()
    started = time.perf_counter()
    prepare = getattr(ctx.reward, "prepare", None)
    if prepare is not None:  # reward=calibrated: reference samples and scores through the actors, once
        prepare([prompt_text(r) for r in records], columns(records))
    reference_s = time.perf_counter() - started

    def reward(rows: list[dict], completions: list[str], completion_ids: Any, log_metric: Any) -> list[float | None]:
        scored = score(rows, [[text] for text in completions], ctx, stats,
                       None if completion_ids is None else [[ids] for ids in completion_ids])
        values = [group[0][0] for group in scored]
        if log_metric is not None:
            for name in ("calibrated", "raw_reward"):
                logged = [group[0][1].get(name) for group in scored if group[0][1].get(name) is not None]
                if logged:
                    log_metric("calibrated_reward" if name == "calibrated" else name, sum(logged) / len(logged))
        return values

    p = ctx.params
    settings = CtrlSettings(
        beta=w.beta, steps=w.steps, prompts_per_step=w.prompts_per_step, num_generations=w.num_generations,
        learning_rate=w.learning_rate, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
        top_p=p.top_p, top_k=p.top_k, seed=p.seed, chat=ctx.chat,
    )
    trained = train(ctx.policy.info()[0]["path"], [{"prompt": prompt_text(r), **r} for r in records], reward,
                    ctx.out_dir, settings, {"reference_sampling_s": reference_s, "prompts": len(records)})
    procedures = [("sample", "sample", 1) if n == 1 else (f"bon{n}", "bon", n) for n in w.eval_n]
    candidate = local_policy(trained_engine(trained.model_dir))
    rows = evaluate(records, ctx, candidate, w.eval_samples, procedures)
    for row in rows:
        row["training"] = {"model": str(trained.model_dir), "steps": trained.card["steps"],
                           "kl_estimator": KL_ESTIMATOR}
    return rows


def columns(records: list[dict]) -> dict[str, list[Any]]:
    """The records' dataset columns for the reward, as `common.score` passes them."""
    names = sorted({k for r in records for k in r} - {"prompt", "messages"})
    return {name: [r.get(name) for r in records] for name in names}
