"""Transfer Q*'s rollouts batched across candidates and prompts, against the reference code's shapes, in one run.

The same workflow (workflow=transfer_qstar, in-process role groups, the default model as reference
and baseline, the sentiment reward) runs three times; only how the baseline's rollouts are sent
changes:

  batched        qsteer: every step's rollouts of all prompts x k candidates x m in ONE call
  per_prompt     one prompt at a time, its k x m rollouts in one call (the reference code's
                 `LLM.generate(flat_trme)` over a prompt's k candidates)
  per_candidate  one call per candidate's m rollouts (the issue's peer: one candidate at a time)
  batched_cached batched, on a baseline engine with the prefix cache (`baseline.prefix_cache_tokens`):
                 a step's contexts extend the previous step's, so each costs its new tokens

Outputs must agree across the three (same per-rollout random streams); wall and CPU time per
generated token are split by role (baseline rollouts, reward, the reference's guided loop).
Torch runs on one thread, so CPU seconds measure the work even on a shared machine; wall seconds
are labelled untrusted when the load average was >= 1.5 at the start.

Run:  .venv/bin/python benchmarks/bench_tqstar.py [--prompts 4 --tokens 8 --k 4 --m 2 --rollout-tokens 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class Timed:
    """A role group proxy that adds up the wall and CPU seconds of each method called on it."""

    def __init__(self, inner: Any, log: dict[str, list[float]], role: str) -> None:
        self.inner, self.log, self.role = inner, log, role

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return attr(*args)
            finally:
                entry = self.log.setdefault(self.role, [0.0, 0.0, 0])
                entry[0] += time.perf_counter() - wall
                entry[1] += time.process_time() - cpu
                entry[2] += 1

        return call

    def __len__(self) -> int:
        return len(self.inner)


class PerCandidate:
    """The baseline role sending each context's rollouts as its own call (one candidate at a time)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def rollouts(self, contexts, starts, params, keys):
        out = []
        for i in range(len(contexts)):
            out += self.inner.rollouts(contexts[i : i + 1], starts[i : i + 1], params, keys[i : i + 1])
        return out


def run_variant(name: str, records: list[dict], policy, baseline, reward, cfg, log: dict) -> tuple[list[dict], float]:
    from qsteer.run import context
    from qsteer.workflows import WORKFLOWS

    timed = Timed(baseline, log, "baseline")  # inside the splitter, so every rollout call is counted
    roles = {"policy": policy, "reward": Timed(reward, log, "reward"),
             "baseline": PerCandidate(timed) if name == "per_candidate" else timed}
    ctx = context(cfg, roles, None)
    started = time.perf_counter()
    batches = [records] if name.startswith("batched") else [[r] for r in records]
    out = []
    for batch in batches:
        out += WORKFLOWS["transfer_qstar"].run(batch, ctx)
    return out, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--rollout-tokens", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="tqstar_cpu")
    ap.add_argument("--variants", default="batched,per_prompt,per_candidate,batched_cached")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    torch.set_num_threads(1)

    from hydra import compose, initialize_config_module

    from qsteer.actors.local import local_policy, local_reward
    from qsteer.data import load_dataset
    from qsteer.engines import build_engine
    from qsteer.rewards.sentiment import SentimentReward

    with initialize_config_module("qsteer.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "progress=false", "workflow=transfer_qstar", f"workflow.top_k={args.k}", f"workflow.rollouts={args.m}",
            f"workflow.rollout_tokens={args.rollout_tokens}", f"workflow.alpha={args.alpha}",
            "workflow.rollout_sampling=sample", f"generation.max_new_tokens={args.tokens}"])
    records = load_dataset("sentiment", limit=args.prompts)
    policy = local_policy(build_engine("hf", device=args.device, num_threads=1))
    baseline = local_policy(build_engine("hf", device=args.device, num_threads=1))
    cached = local_policy(build_engine("hf", device=args.device, num_threads=1, prefix_cache_tokens=65536))
    reward = local_reward(SentimentReward())
    results: dict[str, Any] = {}
    outputs = {}
    variants = args.variants.split(",")
    for name in variants:
        log: dict[str, list[float]] = {}
        cpu = time.process_time()
        rows, wall = run_variant(name, records, policy, cached if name == "batched_cached" else baseline, reward,
                                 cfg, log)
        cpu = time.process_time() - cpu
        tokens = sum(r["stats"]["generated_tokens"] for r in rows)
        rollout_tokens = sum(r["stats"]["baseline_tokens"] for r in rows)
        roles = {role: {"wall_s": round(w, 3), "cpu_s": round(c, 3), "calls": n} for role, (w, c, n) in log.items()}
        loop_wall = wall - sum(w for w, _, _ in log.values())
        loop_cpu = cpu - sum(c for _, c, _ in log.values())
        roles["reference_loop"] = {"wall_s": round(loop_wall, 3), "cpu_s": round(loop_cpu, 3)}
        results[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "generated_tokens": tokens,
                         "rollout_tokens": rollout_tokens, "mean_reward": sum(r["reward"] for r in rows) / len(rows),
                         "wall_s_per_token": {k: round(v["wall_s"] / tokens, 4) for k, v in roles.items()},
                         "roles": roles}
        outputs[name] = [r["output"] for r in rows]
        print(name, json.dumps(results[name]))
    same = all(outputs[name] == outputs[variants[0]] for name in variants)
    speedup = {f"{name}_over_{variants[0]}": {unit: round(results[name][unit] / results[variants[0]][unit], 2)
                                              for unit in ("wall_s", "cpu_s")}
               for name in variants[1:]}
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "cpu_count": os.cpu_count(), "load_avg_at_start": round(load, 2), "device": args.device,
        "wall_trusted": load < 1.5, "settings": vars(args), "torch_threads": 1, "same_outputs": same,
        "speedup": speedup, "variants": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Transfer Q* rollouts: batched vs the reference code's shapes ({report['date']})", "",
             f"Settings: {vars(args)}; torch on 1 thread; load average at start {load:.2f} "
             f"({'wall times trusted' if load < 1.5 else 'wall times UNTRUSTED: the machine was shared'}); "
             f"outputs identical across variants: {same}.", "",
             "| variant | wall s | CPU s | baseline calls | rollout tokens | wall s/token: baseline | reward | loop |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        per = r["wall_s_per_token"]
        lines.append(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['roles']['baseline']['calls']} | "
                     f"{r['rollout_tokens']} | {per['baseline']} | {per['reward']} | {per['reference_loop']} |")
    lines += ["", f"Time of each variant over {variants[0]}'s: {json.dumps(speedup)}", ""]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
