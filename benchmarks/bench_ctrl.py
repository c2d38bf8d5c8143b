"""Wall time of a CTRL step split into reference sampling, scoring and the trainer's own work.

    python benchmarks/bench_ctrl.py [--prompts 4] [--steps 4] [--tokens 16] [--num-reference 16]

Runs `workflow=ctrl_align` with `reward=calibrated` (sentiment) twice on the default model, in the
same process one after the other:
- `actors`: reference sampling in a Ray policy actor and scoring in a Ray reward actor (the design);
- `in_process`: the same role objects inside the trainer's process (`actors.local`), no Ray.
From each run's training card: reference sampling per step (the one-off sampling and scoring of
every prompt's M reference samples, spread over the steps: each step's prompts need theirs once),
scoring per step (the reward calls inside the trainer's step), and the rest of the step (the
trainer's generation, forward/backward, optimiser). Writes benchmarks/results/ctrl_cpu.{md,json}.
The machine's load average is recorded; above 1.5 the timings are labelled untrusted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("qsteer.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def one_run(mode: str, overrides: list[str], folder: Path) -> dict:
    from qsteer.run import run_job

    roles = None
    if mode == "in_process":
        from qsteer.actors.local import local_policy, local_reward
        from qsteer.engines import build_engine
        from qsteer.rewards.sentiment import SentimentReward

        roles = {"policy": local_policy(build_engine("hf", max_batch_rows=256)), "reward": local_reward(SentimentReward())}
    started = time.perf_counter()
    summary = run_job(compose(overrides), folder, roles=roles)
    wall = time.perf_counter() - started
    card = json.loads((folder / "model" / "training_card.json").read_text())
    steps = card["steps"]
    return {
        "mode": mode,
        "wall_s": wall,
        "steps": steps,
        "reference_sampling_s_per_step": card["reference_sampling_s"] / steps,
        "scoring_s_per_step": statistics.mean(card["scoring_s"]),
        "trainer_s_per_step": statistics.mean(card["trainer_s"]),
        "step_s": statistics.mean(card["step_s"]),
        "kl_k1": summary["metrics"].get("kl_k1"),
        "mean_calibrated": summary["metrics"].get("mean_calibrated"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--num-reference", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "ctrl_cpu")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "progress=false", "cluster.dashboard=false", "workflow=ctrl_align", "reward=calibrated",
            f"dataset.limit={args.prompts}", f"workflow.steps={args.steps}", f"generation.max_new_tokens={args.tokens}",
            f"reward.num_reference={args.num_reference}", "workflow.eval_samples=4", "workflow.eval_n=[1,4]",
        ]
        rows = []
        for mode in ("actors", "in_process"):
            # each mode its own cache, so both sample their references
            cache = Path(tmp) / f"cache-{mode}"
            rows.append(one_run(mode, [*overrides, f"reward.cache={cache}"], Path(tmp) / mode))
    trusted = load < 1.5
    result = {"load_average_1m": load, "trusted": trusted, "settings": vars(args) | {"out": str(args.out)},
              "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# CTRL step time split ({args.prompts} prompts, {args.steps} steps of 2 prompts x 4 generations x "
        f"{args.tokens} tokens, M={args.num_reference})",
        "",
        f"load average at start: {load:.2f} ({'trusted' if trusted else 'UNTRUSTED: the machine was busy'})",
        "",
        "| mode | reference sampling s/step | scoring s/step | trainer s/step | step s | run wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['reference_sampling_s_per_step']:.2f} | {r['scoring_s_per_step']:.3f} | "
                     f"{r['trainer_s_per_step']:.2f} | {r['step_s']:.2f} | {r['wall_s']:.1f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
