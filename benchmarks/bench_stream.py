"""Driver memory while scoring streamed records: `workflow=score dataset=files` at 20,000 and 200,000
records, against `dataset=jsonl` (the whole file and every result row in the driver) in the same run.

Each run is the `qsteer` command in its own process (the driver); psutil samples its resident set
size every `--interval` seconds until it exits. Records are cheap: a short prompt and completion
each, scored by the sentiment reward in its reward actor, no generation. The point is memory, not
time: with streaming the driver's peak should not grow with the number of records. Writes
benchmarks/results/stream_cpu.{json,md}.

    python benchmarks/bench_stream.py [--sizes 20000,200000] [--peer-sizes 20000] [--batch-size 1000]
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

import psutil

RESULTS = Path(__file__).parent / "results"
TEXTS = ["I love this, it is wonderful", "This is terrible and sad", "It is a chair", "Great fun, happy ending",
         "Awful, I hate it", "The box is brown", "What a delightful surprise", "Not bad at all"]
SHARD = 10_000  # records per input file


def write_dataset(folder: Path, records: int) -> Path:
    """`records` records as JSONL shards of SHARD lines; the same records as one file for the peer."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = folder.parent / f"{folder.name}.jsonl"
    with open(whole, "w") as all_of_them:
        for start in range(0, records, SHARD):
            with open(folder / f"part-{start // SHARD:05d}.jsonl", "w") as shard:
                for i in range(start, min(start + SHARD, records)):
                    line = json.dumps({"id": f"rec-{i:07d}", "prompt": f"Review number {i} of the product:",
                                       "completion": TEXTS[i % len(TEXTS)]}) + "\n"
                    shard.write(line)
                    all_of_them.write(line)
    return whole


def run(args: list[str], interval: float) -> dict:
    """Run the command, sampling the driver's RSS; its samples (s, MB), peak and wall time."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qsteer.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    while proc.poll() is None:
        try:
            samples.append((round(time.perf_counter() - started, 2), driver.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"qsteer {' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    wall = time.perf_counter() - started
    rss = [mb for _, mb in samples]
    late = rss[len(rss) // 2:] or rss  # the second half of the run: Ray is up, the records stream
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(max(rss), 1),
            "median_rss_second_half_mb": round(sorted(late)[len(late) // 2], 1),
            "samples": [(t, round(mb, 1)) for t, mb in samples[:: max(1, len(samples) // 200)]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000", help="records per streamed run")
    parser.add_argument("--peer-sizes", default="20000", help="records per dataset=jsonl run (the peer)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.25)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    peers = [int(s) for s in args.peer_sizes.split(",") if s]
    root = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    common = ["workflow=score", "progress=false", "cluster.dashboard=false", f"batch_size={args.batch_size}"]
    load_before = os.getloadavg()
    out: dict = {"batch_size": args.batch_size, "interval_s": args.interval, "cpu_count": os.cpu_count(),
                 "load_average_before": load_before, "streamed": {}, "jsonl": {}}
    for n in sorted(set(sizes) | set(peers)):
        whole = write_dataset(root / f"data-{n}", n)
        if n in sizes:
            result = run([*common, "dataset=files", f"dataset.path={root / f'data-{n}'}",
                          f"hydra.run.dir={root / f'files-{n}'}"], args.interval)
            summary = json.loads((root / f"files-{n}" / "summary.json").read_text())
            result |= {"num_prompts": summary["num_prompts"], "mean_reward": summary["mean_reward"],
                       "result_shards": len(list((root / f"files-{n}" / "results").glob("part-*.jsonl")))}
            out["streamed"][n] = result
            print(f"dataset=files {n}: peak {result['peak_rss_mb']} MB, {result['wall_s']} s", flush=True)
        if n in peers:
            result = run([*common, "dataset=jsonl", f"dataset.path={whole}", f"hydra.run.dir={root / f'jsonl-{n}'}"],
                         args.interval)
            summary = json.loads((root / f"jsonl-{n}" / "summary.json").read_text())
            result |= {"num_prompts": summary["num_prompts"], "mean_reward": summary["mean_reward"]}
            out["jsonl"][n] = result
            print(f"dataset=jsonl {n}: peak {result['peak_rss_mb']} MB, {result['wall_s']} s", flush=True)
    out["load_average_after"] = os.getloadavg()
    streamed = out["streamed"]
    if len(streamed) >= 2:
        small, big = min(streamed), max(streamed)
        out["peak_ratio_streamed"] = round(streamed[big]["peak_rss_mb"] / streamed[small]["peak_rss_mb"], 3)
        out["records_ratio"] = big / small
    common_sizes = sorted(set(streamed) & set(out["jsonl"]))
    for n in common_sizes:
        out[f"jsonl_over_streamed_peak_{n}"] = round(out["jsonl"][n]["peak_rss_mb"] / streamed[n]["peak_rss_mb"], 3)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stream_cpu.json").write_text(json.dumps(out, indent=2) + "\n")

    lines = ["# Driver memory while scoring streamed records (workflow=score, sentiment reward, CPU, local Ray)", "",
             f"batch_size={args.batch_size}; input: JSONL files of {SHARD:,} records; the driver's RSS sampled every "
             f"{args.interval} s (psutil).", "",
             "| dataset | records | peak RSS MB | median RSS, 2nd half MB | wall s | result shards |",
             "|---|---|---|---|---|---|"]
    for kind, runs in (("files (Ray Data, streamed)", streamed), ("jsonl (whole file in the driver)", out["jsonl"])):
        for n, r in sorted(runs.items()):
            lines.append(f"| {kind} | {n:,} | {r['peak_rss_mb']} | {r['median_rss_second_half_mb']} | {r['wall_s']} | "
                         f"{r.get('result_shards', 'one results.jsonl')} |")
    lines.append("")
    if "peak_ratio_streamed" in out:
        lines.append(f"Streamed: {out['records_ratio']:.0f}x the records, {out['peak_ratio_streamed']}x the peak RSS.")
    for n in common_sizes:
        lines.append(f"At {n:,} records the jsonl driver peaks at {out[f'jsonl_over_streamed_peak_{n}']}x the "
                     "streamed one.")
    lines.append(f"Load average before/after: {', '.join(f'{x:.1f}' for x in load_before)} / "
                 f"{', '.join(f'{x:.1f}' for x in out['load_average_after'])} (a shared machine: seconds are not "
                 "comparable, memory is the point).")
    (RESULTS / "stream_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
