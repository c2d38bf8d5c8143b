"""Value training as a run: sample from the policy, score with the reward, fit a value (CD-FUDGE or CD-Q).

Per batch (`run`): `value.samples_per_prompt` completions per prompt from the policy role, each
scored by the reward role, written as records (their token ids kept, and whether the prompt is
held out: a fixed share `value.heldout_fraction` of prompts, chosen by a hash of the seed and the
prompt id, so a resumed run holds out the same ones). At the end (`finish`), over every record
of the run folder, the trainer role fits the value (`actors.value.ValueTrainer`, with
`qsteer.training.value`) and returns the checkpoint folder's files, which the orchestrator writes
to RUN_DIR/value with its card: data size, loss curve, held-out correlation with the reward.
Held-out prompts measure generalisation to prompts the value never saw.
"""

from __future__ import annotations

from typing import Any

from qsteer.lm.params import sample_seed
from qsteer.workflows.common import Choice, Context, Stats, assemble, encode, generate, score_completions


def held_out(seed: int, record_id: str, fraction: float) -> bool:
    return sample_seed(seed, f"heldout/{record_id}", 0) / float(1 << 63) < fraction


def run(records: list[dict], ctx: Context) -> list[dict]:
    cfg = ctx.value_config
    stats = Stats()
    prompt_ids, _ = encode(records, ctx)
    completions, errors = generate(records, ctx, cfg.samples_per_prompt, stats)
    scored = score_completions(records, completions, ctx, stats)

    def choose(position: int, candidates: list[dict]) -> Choice:
        for cand, completion in zip(candidates, completions[position], strict=True):
            cand["token_ids"] = completion.token_ids
        record_id = str(records[position]["id"])
        return Choice(fields={"prompt_ids": prompt_ids[position],
                              "heldout": held_out(ctx.params.seed, record_id, cfg.heldout_fraction)})

    return assemble(records, completions, errors, scored, stats, choose)


def finish(results: list[dict], ctx: Context) -> dict[str, Any]:
    """Fit the value on every sample of the run; {"card": ..., "files": {relative name: bytes}}."""
    prompts, completions, rewards, heldout = [], [], [], []
    for record in results:
        if record.get("error") or "prompt_ids" not in record:
            continue
        for cand in record["candidates"]:
            if cand.get("reward") is None or not cand.get("token_ids"):
                continue
            prompts.append(record["prompt_ids"])
            completions.append(cand["token_ids"])
            rewards.append(float(cand["reward"]))
            heldout.append(bool(record["heldout"]))
    if not prompts:
        raise ValueError("workflow=train_value: no scored samples to fit a value on")
    if all(heldout):  # every prompt fell in the held-out share: train on them all, measure nothing
        heldout = [False] * len(heldout)
    return ctx.trainer.fit(prompts, completions, rewards, heldout, list(ctx.eos_token_ids))
