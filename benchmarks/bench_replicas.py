"""One vs two policy replicas on a 2-node local Ray cluster (a head and a worker from `ray start` on
127.0.0.1, one CPU each, as tests/test_cluster.py starts them): wall time, generation time and tokens/s
of the same Best-of-N run on the default model.

Two replicas are spread one per node (`cluster.placement` STRICT_SPREAD); one replica runs on one node.
Each actor gets one torch thread and half a CPU of Ray's resources. On this 2-core machine both nodes
share the same two cores (and other work runs beside them), so this measures what a second replica
costs (scheduling, serialization, a second model in memory) against what a second core gives, not the
speed-up two machines would give. The runs alternate (1, 2, 1, 2, ...) so a change in the machine's
load falls on both sides. Writes benchmarks/results/replicas_cpu.{json,md}.

    python benchmarks/bench_replicas.py [--limit 8] [--n 4] [--tokens 16] [--repeats 2]
    python benchmarks/bench_replicas.py --render     # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(REPO / "tests"))

from test_cluster import Cluster, node_env  # noqa: E402  (the tests' 2-node cluster: ports, temp dir, stop by pid)


def run(cluster: Cluster, out: Path, replicas: int, args: argparse.Namespace) -> dict:
    spread = ["cluster.placement=[{roles: [policy], strategy: STRICT_SPREAD}]"] if replicas > 1 else []
    cmd = [sys.executable, "-m", "qsteer.cli", "progress=false", f"cluster.address={cluster.gcs}",
           f"model.replicas={replicas}", "model.num_cpus=0.5", "model.num_threads=1", f"dataset.limit={args.limit}",
           f"workflow.n={args.n}", f"generation.max_new_tokens={args.tokens}", f"batch_size={args.batch_size}",
           *spread, f"hydra.run.dir={out}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=node_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"replicas={replicas} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"replicas": replicas, "wall_s": round(wall, 2), "startup_s": round(s["startup_s"], 2),
            "generation_s": round(s["generation_s"], 2), "generated_tokens": s["generated_tokens"],
            "tokens_per_s": round(s["generated_tokens"] / s["generation_s"], 1),
            "replica_calls": s["metrics"].get("policy_replica_calls"), "mean_reward": s["mean_reward"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=8, help="prompts")
    parser.add_argument("--n", type=int, default=4, help="Best-of-N's N")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per sample")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per batch (batches go to free replicas)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if args.render:
        render(json.loads((RESULTS / "replicas_cpu.json").read_text()))
        return
    root = Path(tempfile.mkdtemp(prefix="qsb", dir="/tmp"))  # short: Ray's socket paths live under it
    load_before = os.getloadavg()
    cluster = None
    try:
        cluster = Cluster(root)
        runs = [run(cluster, root / f"r{replicas}-{i}", replicas, args)
                for i in range(args.repeats) for replicas in (1, 2)]
    finally:
        Cluster.stop(cluster or type("Partial", (), {"root": root})())
        shutil.rmtree(root, ignore_errors=True)

    def mean(replicas: int, key: str) -> float:
        values = [r[key] for r in runs if r["replicas"] == replicas]
        return round(sum(values) / len(values), 2)

    sides = {str(k): {key: mean(k, key) for key in ("wall_s", "startup_s", "generation_s", "tokens_per_s")}
             for k in (1, 2)}
    out = {"config": vars(args), "model": "default (SmolLM2-135M-Instruct)", "nodes": "2 x ray start, 1 CPU each",
           "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
           "load_average_before": load_before, "load_average_after": os.getloadavg(), "runs": runs,
           "mean": sides,
           "two_over_one": {"wall_s": round(sides["2"]["wall_s"] / sides["1"]["wall_s"], 2),
                            "generation_s": round(sides["2"]["generation_s"] / sides["1"]["generation_s"], 2),
                            "tokens_per_s": round(sides["2"]["tokens_per_s"] / sides["1"]["tokens_per_s"], 2)},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replicas_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    render(out)


def render(out: dict) -> None:
    c = out["config"]
    lines = [f"# One vs two policy replicas on a 2-node local Ray cluster ({c['limit']} prompts, Best-of-{c['n']}, "
             f"{c['tokens']} tokens, batches of {c['batch_size']}, default model, CPU)", "",
             "Both nodes run on the same 2-core machine, and each replica has one torch thread: two replicas can "
             "use both cores where one uses one. So this is what a second replica costs (scheduling, "
             "serialization, a second model in memory) against what a second core gives, on a machine other "
             "work shared; it is not the speed-up of a second machine.", "",
             "| run | replicas | wall s | startup s | generation s | tokens/s | calls per replica |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(out["runs"]):
        lines.append(f"| {i + 1} | {r['replicas']} | {r['wall_s']} | {r['startup_s']} | {r['generation_s']} | "
                     f"{r['tokens_per_s']} | {r['replica_calls']} |")
    ratio = out["two_over_one"]
    lines += ["", f"Two replicas over one (means): wall time {ratio['wall_s']}x, generation time "
              f"{ratio['generation_s']}x, tokens/s {ratio['tokens_per_s']}x. Load average before/after: "
              f"{', '.join(f'{x:.1f}' for x in out['load_average_before'])} / "
              f"{', '.join(f'{x:.1f}' for x in out['load_average_after'])} (a shared machine: read the ratio, "
              "not the seconds)."]
    (RESULTS / "replicas_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
