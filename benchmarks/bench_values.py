"""Cost per generated token of tokenwise controlled decoding against plain sampling, in one run.

Same model object (SmolLM2-135M, fp32, CPU), same prompts (the sentiment openings through the chat
template), same rows and seeds, same top-k (20) for every method:

  plain       HFEngine.generate with top_k=20 (the baseline)
  cd-head     generate_guided with a Q-head on the policy's backbone (PolicyHeadScorer): the values
              come from the loop's own forward; the issue's target is at most 1.3x plain
  cd-separate generate_guided with a separate Q model (here the policy's own weights with a random
              Q-head, a ValueScorer through ValueFunctionScorer): a full forward over every prefix
              per step, without a KV cache, as a value in value actors is called

Each method runs `--repeats` times, interleaved, and the median seconds per generated token is
kept; the ratio is against plain in the same round. The machine's CPU load is recorded beside the
numbers: on a shared machine they are not to be trusted (see the note in the results).

Results: benchmarks/results/values_cpu.{json,md}.
Run:  .venv/bin/python benchmarks/bench_values.py [--prompts 8] [--rows 4] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import psutil
import torch

from qsteer.data import load_dataset
from qsteer.decoding.guided import PolicyHeadScorer, ValueFunctionScorer
from qsteer.engines import SamplingParams
from qsteer.engines.hf import HFEngine
from qsteer.values import ValueScorer
from qsteer.values.model import ValueModel

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = HFEngine(max_batch_rows=256)
    records = load_dataset("sentiment", limit=args.prompts)
    ids = engine.encode([r["prompt"] for r in records])
    keys = [str(r["id"]) for r in records]
    params = SamplingParams(n=args.rows, max_new_tokens=args.tokens, top_k=20, seed=0)

    head = ValueModel.on_policy_model(engine.model, "q")
    separate = ValueModel.on_policy_model(engine.model, "q")  # same weights; its own full forwards
    with torch.no_grad():
        for model, seed in ((head, 0), (separate, 1)):
            model.head.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(seed))
    methods = {
        "plain": lambda: engine.generate(ids, params, keys),
        "cd-head": lambda: engine.generate_guided(ids, params, keys, PolicyHeadScorer(head.head), 1.0),
        "cd-separate": lambda: engine.generate_guided(
            ids, params, keys, ValueFunctionScorer(ValueScorer(separate, pad_id=engine.pad_id)), 1.0),
    }
    per_token: dict[str, list[float]] = {name: [] for name in methods}
    loads = []
    for _ in range(args.repeats):
        for name, run in methods.items():
            psutil.cpu_percent(None)
            started = time.perf_counter()
            out = run()
            wall = time.perf_counter() - started
            loads.append(psutil.cpu_percent(None))
            tokens = sum(len(c.token_ids) for comps in out for c in comps)
            per_token[name].append(wall / tokens)
    median = {name: statistics.median(values) for name, values in per_token.items()}
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": vars(args), "cpu_percent_during_runs": loads,
        "seconds_per_token": median, "ratio_to_plain": {name: median[name] / median["plain"] for name in median},
        "all_runs": per_token,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "values_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Tokenwise controlled decoding: cost per generated token (CPU)", "",
             f"{result['date']}; {args.prompts} prompts x {args.rows} rows, {args.tokens} tokens, top-k 20, "
             f"{args.threads} threads, median of {args.repeats}; CPU busy during runs: "
             f"{min(loads):.0f}-{max(loads):.0f}%", "",
             "| method | ms per token | x plain |", "|---|---|---|"]
    lines += [f"| {name} | {1000 * median[name]:.2f} | {median[name] / median['plain']:.2f} |" for name in median]
    (RESULTS / "values_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
