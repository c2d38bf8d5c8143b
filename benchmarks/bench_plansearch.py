"""Plan search for code on the CPU: the sandbox pool's throughput, and the four code methods side by side.

1. Sandbox executions per second: the pool (`sandbox=pool`: 2 Ray actors x 2 samples at a
   time) against one process judging the same distinct candidates in turn (`Sandbox` with one
   worker, in this process), in the same run.
2. repeated_sampling, ideasearch, plansearch and pgtd on the first `--problems` problems of
   `basic_code` with the default model (hf engine, in-process policy; the sandbox pool in Ray):
   pass@k for k = 1..n (plain and public-filtered), generated tokens, wall time, and the mean
   per-problem Vendi score of the candidates' code (all-MiniLM-L6-v2 embeddings, metrics.vendi).
   Plots: pass@k against k, and against generated tokens per problem (k times the method's
   tokens per candidate: the compute-matched view).

Timings are only comparable within one run; the script records the load average before and
after and labels the run untrusted when it was 1.5 or more (other work on the machine).

    PYTHONPATH=$PWD python benchmarks/bench_plansearch.py --problems 6 --n 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def bench_sandbox(count: int) -> dict:
    from qsteer.actors.group import ActorGroup
    from qsteer.actors.roles import SandboxGroup
    from qsteer.actors.sandbox import Job, Sandbox

    def jobs(tag: str) -> list[Job]:
        return [Job(f"# {tag} {i}\n{RIGHT if i % 2 else WRONG}", TEST, "add") for i in range(count)]

    single = Sandbox(workers=1)
    started = time.perf_counter()
    single.run(jobs("single"))
    single_s = time.perf_counter() - started
    pool = SandboxGroup(ActorGroup(Sandbox, role="sandbox", replicas=2, num_cpus=0.5, workers=2))
    pool.run(jobs("warm-up")[:8])
    started = time.perf_counter()
    verdicts = pool.run(jobs("pool"))
    pool_s = time.perf_counter() - started
    started = time.perf_counter()
    pool.run(jobs("pool"))
    cached_s = time.perf_counter() - started
    assert sum(v.passed for v in verdicts) == count // 2
    return {
        "candidates": count,
        "one_process_per_s": round(count / single_s, 2),
        "pool_2x2_per_s": round(count / pool_s, 2),
        "pool_speedup": round(single_s / pool_s, 2),
        "pool_cached_rerun_per_s": round(count / cached_s, 1),
        "pool": pool,
    }


def run_methods(problems: int, n: int, tokens: int, sandbox, observations: int) -> dict:
    from hydra import compose, initialize_config_module

    from qsteer.actors.local import local_policy
    from qsteer.data import load_dataset
    from qsteer.engines.hf import HFEngine
    from qsteer.metrics.vendi import vendi_score
    from qsteer.results import code_metrics
    from qsteer.rewards.code_tests import extract_code
    from qsteer.run import context
    from qsteer.workflows import WORKFLOWS

    records = load_dataset("basic_code", limit=problems)
    policy = local_policy(HFEngine(num_threads=2))
    common = [f"generation.max_new_tokens={tokens}", "generation.temperature=0.7", "generation.top_p=0.95", "seed=0"]
    methods = {
        "repeated_sampling": [f"workflow.n={n}"],
        "ideasearch": [f"workflow.n={n}"],
        "plansearch": [f"workflow.n={n}", f"workflow.num_observations={observations}"],
        "pgtd": [f"workflow.rollouts={2 * n}", "workflow.top_k=3"],
    }
    out = {}
    for name, overrides in methods.items():
        with initialize_config_module("qsteer.conf", version_base="1.3"):
            cfg = compose("config", overrides=[f"workflow={name}", *overrides, *common, "progress=false"])
        ctx = context(cfg, {"policy": policy, "sandbox": sandbox}, None)
        started = time.perf_counter()
        rows = WORKFLOWS[name].run(records, ctx)
        wall = time.perf_counter() - started
        generated = sum(r["stats"]["generated_tokens"] for r in rows)
        candidates = sum(len(r["candidates"]) for r in rows)
        vendi = [vendi_score([extract_code(c["text"]) or " " for c in r["candidates"]])
                 for r in rows if len(r["candidates"]) > 1]
        out[name] = {
            "overrides": overrides,
            "wall_s": round(wall, 1),
            "generated_tokens_per_problem": round(generated / len(rows), 1),
            "candidates_per_problem": round(candidates / len(rows), 2),
            "selected_pass_rate": round(sum(r["reward"] or 0 for r in rows) / len(rows), 4),
            "vendi_mean": round(sum(vendi) / len(vendi), 3) if vendi else None,
            **code_metrics(rows),
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def plot(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_k, by_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in methods.items():
        curve = m.get("pass_at_k") or []
        ks = list(range(1, len(curve) + 1))
        per_candidate = m["generated_tokens_per_problem"] / max(m["candidates_per_problem"], 1e-9)
        by_k.plot(ks, curve, marker="o", label=name)
        by_tokens.plot([k * per_candidate for k in ks], curve, marker="o", label=name)
    by_k.set(xlabel="k", ylabel="pass@k (hidden tests)", title="pass@k against k")
    by_tokens.set(xlabel="generated tokens per problem (k x tokens per candidate)", ylabel="pass@k",
                  title="pass@k against generated tokens", xscale="log")
    by_k.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    s = result["sandbox"]
    lines = [
        f"# Plan search on the CPU ({'trusted' if result['trusted_timings'] else 'UNTRUSTED timings'}: "
        f"load average {result['load_average_1m'][0]} before, {result['load_average_1m'][1]} after)",
        "",
        f"Arguments: `{json.dumps(result['args'])}`",
        "",
        "## Sandbox executions per second",
        "",
        "| | executions/s |",
        "|---|--:|",
        f"| one process, candidates in turn | {s['one_process_per_s']} |",
        f"| pool: 2 actors x 2 samples | {s['pool_2x2_per_s']} ({s['pool_speedup']}x) |",
        f"| pool, every verdict cached | {s['pool_cached_rerun_per_s']} |",
        "",
        "## Methods (basic_code, default model, seed 0)",
        "",
        "| method | candidates/problem | tokens/problem | wall s | selected pass | pass@1 | pass@n | "
        "public-filtered pass@1 | Vendi (code) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, m in result["methods"].items():
        curve, public = m.get("pass_at_k") or [None], m.get("pass_at_k_public_filtered") or [None]
        lines.append(f"| {name} | {m['candidates_per_problem']} | {m['generated_tokens_per_problem']} | {m['wall_s']} | "
                     f"{m['selected_pass_rate']} | {curve[0]} | {curve[-1]} (n={len(curve)}) | {public[0]} | "
                     f"{m['vendi_mean']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--observations", type=int, default=4)
    parser.add_argument("--executions", type=int, default=120)
    parser.add_argument("--out", default="benchmarks/results/plansearch_cpu")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        result = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(result))
        plot(result["methods"], out.with_suffix(".png"))
        return

    import ray

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        sandbox = bench_sandbox(args.executions)
        pool = sandbox.pop("pool")
        print("sandbox", json.dumps(sandbox), flush=True)
        methods = run_methods(args.problems, args.n, args.tokens, pool, args.observations)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()[0]
    result = {
        "args": vars(args),
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
        "trusted_timings": max(load_before, load_after) < 1.5,
        "sandbox": sandbox,
        "methods": methods,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(methods, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
