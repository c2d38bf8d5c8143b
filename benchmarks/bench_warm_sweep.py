"""A sweep of 4 points on warm actors (`qsteer -m ... cluster.warm=true`, one process) against a fresh
process per point (`qsteer ...` four times): total wall time and the share spent before the first batch
(starting Ray and loading the models: each point's `startup_s`).

Both run the same Best-of-N points on the default model and a local Ray, in the same session, one
after the other. Writes benchmarks/results/warm_sweep_cpu.{json,md}.

    python benchmarks/bench_warm_sweep.py [--limit 4] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
POINTS = [1, 2, 4, 8]


def summaries(folders: list[Path]) -> list[dict]:
    return [json.loads((f / "summary.json").read_text()) for f in folders]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    common = ["progress=false", "cluster.dashboard=false", f"dataset.limit={args.limit}",
              f"generation.max_new_tokens={args.tokens}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    root = Path(tempfile.mkdtemp(prefix="bench-warm-"))

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qsteer.cli", "-m", *common, "cluster.warm=true",
                    f"workflow.n={','.join(map(str, POINTS))}", f"hydra.sweep.dir={root / 'warm'}"],
                   env=env, check=True, capture_output=True)
    warm_wall = time.perf_counter() - started
    warm = summaries([root / "warm" / str(i) for i in range(len(POINTS))])

    started = time.perf_counter()
    for n in POINTS:
        subprocess.run([sys.executable, "-m", "qsteer.cli", *common, f"workflow.n={n}",
                        f"hydra.run.dir={root / 'fresh' / str(n)}"], env=env, check=True, capture_output=True)
    fresh_wall = time.perf_counter() - started
    fresh = summaries([root / "fresh" / str(n) for n in POINTS])

    def side(wall: float, runs: list[dict]) -> dict:
        startup = sum(r["startup_s"] for r in runs)
        return {"wall_s": round(wall, 1), "startup_s": round(startup, 1), "startup_share": round(startup / wall, 3),
                "actors_started": [r["metrics"].get("actors_started", {}).get("policy") for r in runs],
                "mean_reward": [r["mean_reward"] for r in runs]}

    out = {"points": POINTS, "limit": args.limit, "tokens": args.tokens, "load_average": os.getloadavg(),
           "warm": side(warm_wall, warm), "fresh": side(fresh_wall, fresh)}
    out["fresh_over_warm_wall"] = round(fresh_wall / warm_wall, 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "warm_sweep_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Warm sweep vs a fresh process per point (workflow.n={POINTS}, {args.limit} prompts, "
             f"{args.tokens} tokens, default model, local Ray, CPU)", "",
             "| | wall s | startup s (Ray + model loads) | startup share | policy actors started per point |",
             "|---|---|---|---|---|"]
    for name in ("warm", "fresh"):
        s = out[name]
        lines.append(f"| {name} | {s['wall_s']} | {s['startup_s']} | {s['startup_share']:.0%} | {s['actors_started']} |")
    lines += ["", f"fresh / warm wall time: {out['fresh_over_warm_wall']}x; load average during the run: "
              f"{', '.join(f'{x:.1f}' for x in out['load_average'])} (a shared machine: the ratio, not the seconds)."]
    (RESULTS / "warm_sweep_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
