"""Plan search for code on the CPU: the sandbox pool's throughput, and the four code methods side by side.

1. Sandbox executions per second (`--executions`, 0 to skip): the pool (`sandbox=pool`: 2 Ray
   actors x 2 samples at a time) against one process judging the same distinct candidates in
   turn (`Sandbox` with one worker, in this process), in the same run.
2. repeated_sampling, ideasearch, plansearch and pgtd on the first `--problems` problems of
   `basic_code` with the default model (hf engine, in-process policy; an in-process sandbox
   judging 2 samples at a time): pass@k for k = 1..n (plain and public-filtered), the share of
   samples that pass (how often the model solves the set), generated tokens, wall time, the
   mean per-problem Vendi score of the candidates' code (`metrics.vendi`) and, with
   `--idea-diversity`, the judge-based idea diversity (`metrics.idea_diversity`).
   PG-TD's candidates are the distinct programs of one tree search, not samples, so its pass@k
   over them is no sampling estimate: it is reported by its selected program (the best public
   share) and by whether any of its programs passes.
   Compute-matched: each sampling method's pass@k at the largest k whose tokens (k times the
   method's tokens per candidate, the reference's normalisation) fit in the budget of
   repeated sampling's n samples.
   Plots: pass@k against k, and against generated tokens per problem (PG-TD as one point: its
   selected program at its tokens).

Timings are only comparable within one run; the script records the load average before and
after and labels the run untrusted when it was 1.5 or more (other work on the machine). The
JSON is rewritten after every method, so a run stopped early keeps what finished.

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


SAMPLING_METHODS = ("repeated_sampling", "ideasearch", "plansearch")


def run_methods(args: argparse.Namespace, sandbox, save) -> dict:
    from hydra import compose, initialize_config_module

    from qsteer.actors.local import local_policy
    from qsteer.data import load_dataset
    from qsteer.engines.hf import HFEngine
    from qsteer.results import code_metrics
    from qsteer.run import context
    from qsteer.workflows import WORKFLOWS

    records = load_dataset("basic_code", limit=args.problems)
    policy = local_policy(HFEngine(num_threads=2))
    common = [f"generation.max_new_tokens={args.tokens}", f"generation.temperature={args.temperature}",
              "generation.top_p=0.95", f"seed={args.seed}",
              f"workflow.idea_diversity={str(args.idea_diversity).lower()}"]
    n = args.n
    overrides = {
        "repeated_sampling": [f"workflow.n={n}"],
        "ideasearch": [f"workflow.n={n}"],
        "plansearch": [f"workflow.n={n}", f"workflow.num_observations={args.observations}",
                       f"workflow.layers={args.layers}"],
        "pgtd": [f"workflow.rollouts={args.pgtd_rollouts or 2 * n}", "workflow.top_k=3"],
    }
    out = {}
    for name in args.methods.split(","):
        with initialize_config_module("qsteer.conf", version_base="1.3"):
            cfg = compose("config", overrides=[f"workflow={name}", *overrides[name], *common, "progress=false"])
        ctx = context(cfg, {"policy": policy, "sandbox": sandbox}, None)
        started = time.perf_counter()
        rows = WORKFLOWS[name].run(records, ctx)  # one batch: every stage is one call over all problems
        judge_s = sum(r["stats"].get("judge_s", 0.0) for r in rows)
        wall = time.perf_counter() - started - judge_s  # the idea judge's time is the measurement's
        generated = sum(r["stats"]["generated_tokens"] for r in rows)
        candidates = [c for r in rows for c in r["candidates"]]
        metrics = code_metrics(rows, vendi=True)
        if name == "pgtd":  # its candidates are one search's programs: no sampling pass@k over them
            metrics.pop("pass_at_k"), metrics.pop("pass_at_k_public_filtered")
        out[name] = {
            "overrides": overrides[name],
            "wall_s": round(wall, 1),
            "generated_tokens_per_problem": round(generated / len(rows), 1),
            "candidates_per_problem": round(len(candidates) / len(rows), 2),
            "sample_pass_rate": round(sum(bool(c["passed"]) for c in candidates) / max(len(candidates), 1), 4),
            "problems_solved": sum(any(c["passed"] for c in r["candidates"]) for r in rows),
            "problems": len(rows),
            "judge_tokens_per_problem": round(sum(r["stats"].get("judge_tokens", 0) for r in rows) / len(rows), 1),
            **metrics,
        }
        print(name, json.dumps(out[name]), flush=True)
        save(out)
    return out


def compute_matched(methods: dict) -> dict:
    """Each sampling method's pass@k at the largest k whose tokens fit repeated sampling's whole budget."""
    if "repeated_sampling" not in methods:
        return {}
    rs = methods["repeated_sampling"]
    budget = rs["generated_tokens_per_problem"]
    out = {"budget_tokens_per_problem": budget}
    for name in SAMPLING_METHODS:
        m = methods.get(name)
        if not m or not m.get("pass_at_k"):
            continue
        per_candidate = m["generated_tokens_per_problem"] / max(m["candidates_per_problem"], 1e-9)
        k = min(int(budget // per_candidate), len(m["pass_at_k"]))
        out[name] = {"k": k, "pass_at_k": m["pass_at_k"][k - 1] if k >= 1 else None}
    if "pgtd" in methods:
        out["pgtd"] = {"tokens_per_problem": methods["pgtd"]["generated_tokens_per_problem"],
                       "selected_pass_rate": methods["pgtd"]["selected_pass_rate"]}
    return out


def plot(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_k, by_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in methods.items():
        if name == "pgtd":  # one search: its selected program, at k = 1 and at its tokens
            by_k.plot([1], [m["selected_pass_rate"]], marker="*", markersize=12, linestyle="", label="pgtd (selected)")
            by_tokens.plot([m["generated_tokens_per_problem"]], [m["selected_pass_rate"]], marker="*",
                           markersize=12, linestyle="", label="pgtd (selected)")
            continue
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
    a = result["args"]
    lines = [
        f"# Plan search on the CPU ({'trusted' if result['trusted_timings'] else 'UNTRUSTED timings'}: "
        f"load average {result['load_average_1m'][0]} before, {result['load_average_1m'][1]} after)",
        "",
        f"Arguments: `{json.dumps(a)}`",
        "",
    ]
    s = result.get("sandbox")
    if s:
        lines += [
            "## Sandbox executions per second",
            "",
            "| | executions/s |",
            "|---|--:|",
            f"| one process, candidates in turn | {s['one_process_per_s']} |",
            f"| pool: 2 actors x 2 samples | {s['pool_2x2_per_s']} ({s['pool_speedup']}x) |",
            f"| pool, every verdict cached | {s['pool_cached_rerun_per_s']} |",
            "",
        ]
    lines += [
        f"## Methods (basic_code problems 0-{a['problems'] - 1}, default model, T={a['temperature']}, top_p=0.95, "
        f"{a['tokens']} new tokens, seed {a['seed']})",
        "",
        "| method | candidates/problem | tokens/problem | wall s | samples passing | problems solved | "
        "selected pass | pass@1 | pass@n | public-filtered pass@1 | Vendi (code) | idea diversity |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, m in result["methods"].items():
        curve, public = m.get("pass_at_k") or [None], m.get("pass_at_k_public_filtered") or [None]
        at_n = f"{curve[-1]} (n={len(curve)})" if m.get("pass_at_k") else "-"
        lines.append(f"| {name} | {m['candidates_per_problem']} | {m['generated_tokens_per_problem']} | {m['wall_s']} | "
                     f"{m['sample_pass_rate']} | {m['problems_solved']}/{m['problems']} | {m['selected_pass_rate']} | "
                     f"{curve[0] if m.get('pass_at_k') else '-'} | {at_n} | "
                     f"{public[0] if m.get('pass_at_k') else '-'} | {m.get('vendi')} | {m.get('idea_diversity', '-')} |")
    missing = [name for name in a["methods"].split(",") if name not in result["methods"]]
    if missing:
        lines += ["", f"Did not finish (the run was stopped before them): {', '.join(missing)}."]
    matched = result.get("compute_matched") or {}
    if matched:
        lines += ["", f"Compute-matched at repeated sampling's budget ({matched['budget_tokens_per_problem']} "
                  "tokens per problem): " + "; ".join(
                      f"{name} pass@{v['k']} = {v['pass_at_k']}" for name, v in matched.items()
                      if name in SAMPLING_METHODS)
                  + (f"; pgtd selected {matched['pgtd']['selected_pass_rate']} at "
                     f"{matched['pgtd']['tokens_per_problem']} tokens" if "pgtd" in matched else "") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--observations", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="plansearch's observation layers (1 or 2)")
    parser.add_argument("--pgtd-rollouts", type=int, default=0, help="PG-TD's iterations (default 2n)")
    parser.add_argument("--idea-diversity", action="store_true", help="also judge idea diversity (costs generations)")
    parser.add_argument("--methods", default="repeated_sampling,ideasearch,plansearch,pgtd")
    parser.add_argument("--executions", type=int, default=120, help="sandbox benchmark size; 0 skips it")
    parser.add_argument("--out", default="benchmarks/results/plansearch_cpu")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        result = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(result))
        plot(result["methods"], out.with_suffix(".png"))
        return

    from qsteer.actors.local import local_sandbox

    load_before = os.getloadavg()[0]
    sandbox = None
    if args.executions:
        import ray

        ray.init(num_cpus=4, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
        try:
            sandbox = bench_sandbox(args.executions)
            sandbox.pop("pool")
            print("sandbox", json.dumps(sandbox), flush=True)
        finally:
            ray.shutdown()
    result = {"args": vars(args), "sandbox": sandbox, "methods": {}}
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(methods: dict) -> None:
        load_now = os.getloadavg()[0]
        result.update({
            "load_average_1m": [round(load_before, 2), round(load_now, 2)],
            "trusted_timings": max(load_before, load_now) < 1.5,
            "methods": methods,
            "compute_matched": compute_matched(methods),
        })
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    run_methods(args, local_sandbox(1, workers=2), save)
    out.with_suffix(".md").write_text(markdown(result))
    plot(result["methods"], out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
