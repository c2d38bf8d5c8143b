"""The hf engine's prefix cache on step-level beam search: hit rate and speedup, cache off vs on, one run.

`workflow=beam_search` on the first `--prompts` sentiment prompts with the VADER reward, the default
model in fp32 on the CPU, run on the in-process groups (no Ray) through the workflow function
itself, so every policy call is what a real run makes. The same engine weights run it twice per
repeat, in alternating order: with `prefix_cache_tokens=0` (every step prefills each candidate's
whole prompt: the chat header, the prompt and all earlier steps) and with a fresh cache of
`--cache-tokens` tokens (each step prefills only the previous step's tokens, once per beam).
Reported: wall time of the search, the engine's prefilled and reused tokens and token hit rate,
the speedup (off time / on time, same run), and whether both gave the same outputs (fp32: the
cached prefill's numbers may differ in their last bits, which can flip a rare sampled token).

The machine's load average is recorded before and after; above 1.5 the numbers are marked
untrusted (a decode loop on 2 threads slows far more than proportionally when shared).

Run:  .venv/bin/python benchmarks/bench_prefix_cache.py     (--help for smaller runs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUIET_LOAD = 1.5


def run_search(engine, cfg, records, reward) -> tuple[list[dict], float]:
    from qsteer.actors.local import local_policy, local_reward
    from qsteer.run import context
    from qsteer.workflows import WORKFLOWS

    ctx = context(cfg, {"policy": local_policy(engine), "reward": local_reward(reward)}, None)
    started = time.perf_counter()
    rows = WORKFLOWS[cfg.workflow.name].run(records, ctx)
    return rows, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="workflow.n: candidates per prompt per step")
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="off/on pairs, alternating which goes first")
    ap.add_argument("--cache-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    from hydra import compose, initialize_config_module

    from qsteer.data import load_dataset
    from qsteer.engines.hf import HFEngine
    from qsteer.lm.prefix_cache import PrefixCache
    from qsteer.rewards.sentiment import SentimentReward

    with initialize_config_module("qsteer.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "workflow=beam_search", f"workflow.n={args.n}", f"workflow.beam_width={args.beam_width}",
            f"workflow.block_size={args.block_size}", f"generation.max_new_tokens={args.max_new_tokens}",
            f"seed={args.seed}", "reward=sentiment"])
    records = load_dataset("sentiment", limit=args.prompts)
    reward = SentimentReward()
    engine = HFEngine(max_batch_rows=256)
    assert engine.dtype == torch.float32 and engine.device.type == "cpu", (engine.dtype, engine.device)
    warm = records[:1]
    run_search(engine, cfg, warm, reward)

    runs: dict[str, list[dict]] = {"off": [], "on": []}
    outputs: dict[str, list] = {}
    for repeat in range(args.repeats):
        order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
        for mode in order:
            engine.prefix_cache = PrefixCache(args.cache_tokens) if mode == "on" else None
            rows, wall = run_search(engine, cfg, records, reward)
            cache = engine.prefix_cache_stats()
            requested = sum(r["stats"]["prompt_tokens"] for r in rows)
            runs[mode].append({
                "wall_s": round(wall, 3),
                "generated_tokens": sum(r["stats"]["generated_tokens"] for r in rows),
                "prompt_tokens_requested": requested,
                "prefilled_tokens": cache["prefilled_tokens"] if cache else requested,
                "reused_tokens": cache["reused_tokens"] if cache else 0,
                "token_hit_rate": cache["token_hit_rate"] if cache else 0.0,
                "hits": cache["hits"] if cache else 0, "lookups": cache["lookups"] if cache else 0,
                "deduplicated": cache["deduplicated"] if cache else 0,
                "steps": max(r["stats"]["steps"] for r in rows),
                "mean_reward": round(statistics.fmean(r["reward"] for r in rows if r["reward"] is not None), 4),
            })
            outputs.setdefault(mode, [r["output"] for r in rows])
            print(mode, runs[mode][-1], flush=True)
    load_after = os.getloadavg()[0]

    off = statistics.median(r["wall_s"] for r in runs["off"])
    on = statistics.median(r["wall_s"] for r in runs["on"])
    trusted = max(load_before, load_after) < QUIET_LOAD
    summary = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": vars(args) | {"out": str(args.out)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_before": round(load_before, 2),
                    "load_after": round(load_after, 2)},
        "trusted": trusted,
        "runs": runs,
        "median_wall_s": {"off": off, "on": on},
        "speedup": round(off / on, 3),
        "identical_outputs": outputs["off"] == outputs["on"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache_cpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    first_on, first_off = runs["on"][0], runs["off"][0]
    lines = [
        "# Prefix cache on beam search (CPU)",
        "",
        f"`benchmarks/bench_prefix_cache.py`, {summary['date']}: beam search (n={args.n}, beam_width="
        f"{args.beam_width}, block_size={args.block_size}, {args.max_new_tokens} new tokens) on {args.prompts} "
        f"sentiment prompts, VADER reward, default model fp32, {args.threads} threads, {args.repeats} off/on pairs "
        "in alternating order (median wall time).",
        "",
        "| cache | wall s (median) | prompt tokens requested | prefilled | reused | token hit rate | hits / lookups "
        "| speedup |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        f"| off | {off:.2f} | {first_off['prompt_tokens_requested']} | {first_off['prefilled_tokens']} | 0 | 0 | "
        "- | 1.00x |",
        f"| on ({args.cache_tokens} tokens) | {on:.2f} | {first_on['prompt_tokens_requested']} | "
        f"{first_on['prefilled_tokens']} | {first_on['reused_tokens']} | {first_on['token_hit_rate']:.1%} | "
        f"{first_on['hits']} / {first_on['lookups']} | **{off / on:.2f}x** |",
        "",
        f"- Same outputs with and without the cache: {summary['identical_outputs']}.",
        f"- Load average before / after: {load_before:.2f} / {load_after:.2f}. "
        + ("Quiet machine: the timings are trustworthy." if trusted else
           f"**UNTRUSTED**: the machine was shared (load >= {QUIET_LOAD}); token counts hold, the timings and "
           "the speedup need a rerun on a quiet machine."),
        "",
    ]
    (args.out / "prefix_cache_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
