"""Speculative decoding speed on the CPU: each qsteer draft kind against plain decoding and against
transformers' assisted generation and prompt lookup, in one run, at batch 1 (where speculation pays).

Prompts: the first HumanEval problems and the sentiment openings, both through the chat template (as
`qsteer dataset=humaneval` sends them); 128 new tokens; greedy and sampled (temperature 1). Same model
object for every method, fp32, 2 threads. Greedy rows decode the same tokens with every method, so
their ratios compare equal work; sampled rows draw different sequences of different lengths per
method, so their ratios also carry length differences.

Methods:
  plain          qsteer HFEngine.generate, no draft (the speedup baseline)
  lookup-4       prompt lookup (gamma 4, 3-gram): qsteer's default
  lookup-10      prompt lookup (gamma 10, 3-gram): transformers' default length
  recycle        Token Recycling (80-node tree, table warmed on one held-out prompt first)
  layerskip      the policy with 45% of middle sub-blocks skipped (gamma 4)
  model          an 8-layer truncation of the policy as a separate draft LM (gamma 4)
  hf-plain       transformers generate
  hf-lookup      transformers generate(prompt_lookup_num_tokens=10)
  hf-assisted    transformers generate(assistant_model=<the same 8-layer draft>)

Greedy rows also check losslessness: qsteer's speculative tokens against its plain tokens.
Results: benchmarks/results/speculative_cpu.{json,md} and speculative_cpu.png.

Run:  .venv/bin/python benchmarks/bench_speculative.py [--prompts 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from qsteer.data import load_dataset
from qsteer.engines.base import SamplingParams
from qsteer.engines.hf import HFEngine
from qsteer.metrics import rates, sum_spec

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(width=140)
TARGET_CODE_SPEEDUP = 2.0

DRAFTS = {
    "lookup-4": {"kind": "lookup", "gamma": 4, "max_ngram": 3},
    "lookup-10": {"kind": "lookup", "gamma": 10, "max_ngram": 3},
    "recycle": {"kind": "recycle"},
    "layerskip": {"kind": "layerskip", "gamma": 4},
    "model": {"kind": "model", "gamma": 4},
}


def truncated_draft(engine: HFEngine, layers: int, folder: Path) -> str:
    """A separate draft LM with the policy's tokenizer: its first `layers` layers, final norm and head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.path)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(folder)
    engine.tokenizer.save_pretrained(folder)
    return str(folder)


def prompts(engine: HFEngine, count: int) -> dict[str, list[list[int]]]:
    code = [r["prompt"] for r in load_dataset("humaneval", limit=count + 1)]
    chat = [r["prompt"] for r in load_dataset("sentiment", limit=count + 1)]
    return {"humaneval": engine.encode(code), "sentiment": engine.encode(chat)}


def run_qsteer(engine, ids, params) -> tuple[float, list[list[int]], dict]:
    started = time.perf_counter()
    tokens, specs = [], []
    for i, prompt in enumerate(ids):  # batch 1: one request at a time
        completion = engine.generate([prompt], params, keys=[str(i)])[0][0]
        tokens.append(completion.token_ids)
        specs.append(completion.spec)
    return time.perf_counter() - started, tokens, sum_spec(specs) or {}


def run_hf(engine, ids, temperature, max_new, **kwargs) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    tokens = []
    for i, prompt in enumerate(ids):
        torch.manual_seed(i)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {
            "do_sample": False}
        out = engine.model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=max_new, pad_token_id=engine.pad_id, eos_token_id=engine.eos_token_ids, **sampling,
            **kwargs,
        )
        tokens.append(out[0, len(prompt):].tolist())
    return time.perf_counter() - started, tokens


def count_tokens(tokens: list[list[int]], eos: list[int]) -> int:
    total = 0
    for seq in tokens:
        cut = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
        total += cut
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = HFEngine(num_threads=2)
    load = psutil.getloadavg()[0]
    if load > 1.0:
        console.print(f"[yellow]load average {load:.1f}: timings on 2 cores suffer from any other work")
    folder = Path(tempfile.mkdtemp(prefix="qsteer-draft-"))
    draft_path = truncated_draft(engine, 8, folder)
    from transformers import AutoModelForCausalLM

    assistant = AutoModelForCausalLM.from_pretrained(draft_path).eval()
    DRAFTS["model"]["path"] = draft_path
    sets = prompts(engine, args.prompts)
    rows = []
    modes = {"greedy": 0.0, "sampled": 1.0}
    methods = ["plain", *DRAFTS, "hf-plain", "hf-lookup", "hf-assisted"]
    with Progress(console=console) as progress:
        task = progress.add_task("speculative", total=len(sets) * len(modes) * len(methods))
        for dataset, ids in sets.items():
            warm, ids = ids[0], ids[1:]  # warms caches and the recycling table; never timed
            for mode, temperature in modes.items():
                plain_tokens = None
                for method in methods:
                    progress.update(task, description=f"{dataset} {mode} {method}")
                    params = SamplingParams(max_new_tokens=args.tokens, temperature=temperature, seed=0,
                                            speculative=DRAFTS.get(method))
                    spec: dict = {}
                    if method.startswith("hf-"):
                        extra = {"hf-lookup": {"prompt_lookup_num_tokens": 10},
                                 "hf-assisted": {"assistant_model": assistant}}.get(method, {})
                        run_hf(engine, [warm], temperature, 8, **extra)
                        wall, tokens = run_hf(engine, ids, temperature, args.tokens, **extra)
                    else:
                        engine.generate([warm], params, keys=["warm"])
                        wall, tokens, spec = run_qsteer(engine, ids, params)
                    if method == "plain":
                        plain_tokens = tokens
                    n_tokens = count_tokens(tokens, engine.eos_token_ids)
                    row = {"dataset": dataset, "mode": mode, "method": method, "tokens": n_tokens,
                           "wall_s": round(wall, 3), "tokens_per_s": round(n_tokens / wall, 2), **rates(spec)}
                    if mode == "greedy" and method in DRAFTS:
                        row["identical_to_plain"] = tokens == plain_tokens
                    rows.append(row)
                    progress.advance(task)
    for row in rows:
        base = next(r for r in rows if r["dataset"] == row["dataset"] and r["mode"] == row["mode"]
                    and r["method"] == "plain")
        hf = next(r for r in rows if r["dataset"] == row["dataset"] and r["mode"] == row["mode"]
                  and r["method"] == "hf-plain")
        row["speedup_vs_plain"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        row["speedup_vs_hf_plain"] = round(row["tokens_per_s"] / hf["tokens_per_s"], 3)
    write(rows, args, load)


def write(rows: list[dict], args, load: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "prompts_per_dataset": args.prompts,
            "new_tokens": args.tokens, "threads": 2, "dtype": "float32", "batch": 1, "load_avg_start": load,
            "cpu_count": os.cpu_count()}
    (RESULTS / "speculative_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = Table(title="speculative decoding, batch 1, CPU")
    headers = ["dataset", "mode", "method", "tokens/s", "vs plain", "vs hf-plain", "accept", "tau", "identical"]
    for h in headers:
        table.add_column(h, justify="left" if h in ("dataset", "mode", "method") else "right")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["dataset"], r["mode"], r["method"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_plain']:.2f}x",
                 f"{r['speedup_vs_hf_plain']:.2f}x", f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "",
                 f"{r['mean_accepted_length']:.2f}" if "mean_accepted_length" in r else "",
                 {True: "yes", False: "NO"}.get(r.get("identical_to_plain"), "")]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    # the verdict uses greedy rows: there every method decodes the same tokens (checked: `identical`)
    best = max((r for r in rows if r["dataset"] == "humaneval" and r["mode"] == "greedy" and r["method"] in DRAFTS
                and r["method"] != "model"), key=lambda r: r["speedup_vs_plain"])
    verdict = "met" if best["speedup_vs_plain"] >= TARGET_CODE_SPEEDUP and best["identical_to_plain"] else "missed"
    summary = (f"Best train-free draft on code (greedy, lossless): {best['method']} at "
               f"{best['speedup_vs_plain']:.2f}x over plain decoding; target {TARGET_CODE_SPEEDUP:.0f}x {verdict}.")
    console.print(summary)
    md = [f"# Speculative decoding on the CPU ({meta['date']})", "",
          f"Batch 1, {args.tokens} new tokens, {args.prompts} prompts per dataset, fp32, 2 threads; "
          f"load average at start {load:.2f}. tau = tokens per verify forward; accept = kept / drafted tokens.", "",
          *lines, "", summary, ""]
    (RESULTS / "speculative_cpu.md").write_text("\n".join(md))
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, dataset in zip(axes, ("humaneval", "sentiment"), strict=True):
        subset = [r for r in rows if r["dataset"] == dataset]
        methods = list(dict.fromkeys(r["method"] for r in subset))
        for offset, mode in ((-0.2, "greedy"), (0.2, "sampled")):
            values = [next(r["speedup_vs_plain"] for r in subset if r["method"] == m and r["mode"] == mode)
                      for m in methods]
            ax.bar([i + offset for i in range(len(methods))], values, width=0.4, label=mode)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right")
        ax.set_title(dataset)
    axes[0].set_ylabel("speedup over qsteer plain decoding")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "speculative_cpu.png", dpi=120)


if __name__ == "__main__":
    main()
