"""Best-of-N generation throughput on the CPU: qsteer's hf engine against its peers, in one run.

Methods (same model object, fp32, same prompts, temperature 1.0, no top-k/top-p):
  q  qsteer's HFEngine.generate in-process (one prefill per prompt, n rows share it)
  r  the same call through a Ray PolicyActor (ActorGroup, 1 replica)
  a  transformers `model.generate` once per sample (batch 1) -- the naive loop; timed on a subset
  b  transformers `model.generate` once per prompt with num_return_sequences=n

The gains of the plain loop's two speed features, each on its own, in the same run, with
`--slots` batch slots (fewer than prompts x n rows, so rows wait for slots):
  q-chunked     rows decoded in fixed chunks of `--slots` rows (the loop before continuous batching)
  q-continuous  finished rows' slots handed to waiting rows (continuous batching)
  q-fused       continuous batching and fused q/k/v and gate/up projections
and a micro-benchmark of fused against separate projection matmuls at decode shapes. All
qsteer rows must return the same tokens (checked and reported).

It also measures this machine's fp32 matmul GFLOP/s and turns it into a roofline:
  roofline tokens/s = GFLOP/s / (2 * num_parameters / 1e9)
(tied input/output embeddings are counted once). Results go to benchmarks/results/.

Run:  .venv/bin/python benchmarks/bench_best_of_n.py        (or `make bench`)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the summary table
    console = Console(width=120)

# Targets the md comments on.
TARGET_Q_OVER_A = 5.0  # qsteer >= 5x the per-sample generate loop
TARGET_Q_OVER_B = 1.0  # qsteer no slower than generate(num_return_sequences=n)
TARGET_ROOFLINE = 0.60  # qsteer >= 60% of the matmul roofline
TARGET_RAY_OVERHEAD = 0.05  # actor path < 5% slower than in-process


# -- machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int, load_average: float) -> dict:
    import ray
    import transformers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min_at_start": load_average,
    }


def matmul_gflops(m: int, k: int, n: int, seconds: float = 1.5, trials: int = 5) -> dict:
    """fp32 GFLOP/s of [m x k] @ [k x n]: best and median over `trials` timed blocks."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    flops = 2.0 * m * k * n
    # calibrate: how many iterations fill seconds/trials
    torch.matmul(a, b, out=out)
    iters, elapsed = 1, 0.0
    while elapsed < 0.05:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        elapsed = time.perf_counter() - t0
        if elapsed < 0.05:
            iters *= 2
    iters = max(1, int(iters * (seconds / trials) / elapsed))
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        rates.append(flops * iters / (time.perf_counter() - t0) / 1e9)
    return {
        "shape": f"[{m}x{k}] @ [{k}x{n}]",
        "iters_per_trial": iters,
        "gflops_best": max(rates),
        "gflops_median": statistics.median(rates),
    }


def count_parameters(model: torch.nn.Module) -> dict:
    # model.parameters() yields each tensor once, so tied embeddings / lm_head count once.
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return {"total": total, "embedding": emb.numel(), "tied_embeddings": tied}


# -- token counting for transformers -------------------------------------------------------
def count_hf_tokens(sequences: torch.Tensor, prompt_len: int, eos_ids: list[int]) -> list[int]:
    """Generated tokens per row: up to and including the first EOS (later positions are padding)."""
    new = sequences[:, prompt_len:]
    is_eos = torch.isin(new, torch.tensor(eos_ids))
    counts = []
    for row in range(new.shape[0]):
        hits = is_eos[row].nonzero()
        counts.append(int(hits[0, 0]) + 1 if len(hits) else int(new.shape[1]))
    return counts


def hf_generate(model, prompt: list[int], n: int, max_new_tokens: int, pad_id: int) -> torch.Tensor:
    ids = torch.tensor([prompt])
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,  # transformers defaults to top_k=50; qsteer samples from the full distribution
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=pad_id,
    )


class CpuMeter:
    """Wall time of the timed blocks, the CPU time the measured process spent in them, and the CPU
    time everything else on the machine spent in them.

    On a shared machine this tells a clean number from a contended one: a method that had its
    cores to itself shows ~100% "CPU busy" and ~0 "other load"; one that shared them shows less
    busy, more other load, and a lower tokens/s.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.proc = psutil.Process(pid)
        self.seconds = self.cpu_seconds = self.other_seconds = 0.0

    @contextmanager
    def timed(self):
        own0, all0, t0 = self._own(), self._machine(), time.perf_counter()
        yield self
        seconds, own = time.perf_counter() - t0, self._own() - own0
        self.seconds += seconds
        self.cpu_seconds += own
        self.other_seconds += max(0.0, self._machine() - all0 - own)

    def _own(self) -> float:
        times = self.proc.cpu_times()
        return times.user + times.system

    @staticmethod
    def _machine() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "guest", 0.0)

    def stats(self, threads: int) -> dict:
        return {
            "cpu_utilisation": self.cpu_seconds / (self.seconds * threads),
            "other_load_cores": self.other_seconds / self.seconds,
        }


def fused_matmuls(hidden: int, kv: int, inter: int, rows_list: tuple[int, ...], trials: int = 5) -> list[dict]:
    """Separate against fused projection matmuls at decode shapes: best ms of `trials` timed blocks."""
    linear = torch.nn.functional.linear
    wq, wk, wv = torch.randn(hidden, hidden), torch.randn(kv, hidden), torch.randn(kv, hidden)
    wg, wu = torch.randn(inter, hidden), torch.randn(inter, hidden)
    wqkv, wgu = torch.cat([wq, wk, wv]), torch.cat([wg, wu])

    def best_ms(fn) -> float:
        fn()
        iters, elapsed = 1, 0.0
        while elapsed < 0.02:
            iters *= 2
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            elapsed = time.perf_counter() - t0
        times = []
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters * 1e3)
        return min(times)

    out = []
    for rows in rows_list:
        x = torch.randn(rows, hidden)
        qkv_sep = best_ms(lambda x=x: (linear(x, wq), linear(x, wk), linear(x, wv)))
        qkv_fused = best_ms(lambda x=x: linear(x, wqkv))
        gu_sep = best_ms(lambda x=x: (linear(x, wg), linear(x, wu)))
        gu_fused = best_ms(lambda x=x: linear(x, wgu))
        out.append({"rows": rows, "qkv_separate_ms": qkv_sep, "qkv_fused_ms": qkv_fused,
                    "gate_up_separate_ms": gu_sep, "gate_up_fused_ms": gu_fused,
                    "qkv_speedup": qkv_sep / qkv_fused, "gate_up_speedup": gu_sep / gu_fused})
    return out


def result(seconds: float, tokens: int, samples: int, **extra) -> dict:
    return {
        "seconds": seconds,
        "tokens": tokens,
        "samples": samples,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        **extra,
    }


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in-process and in the actor")
    ap.add_argument("--a-prompts", type=int, default=2, help="method (a) runs on this many prompts ...")
    ap.add_argument("--a-samples", type=int, default=8, help="... times this many samples each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--slots", type=int, default=64, help="batch slots of the continuous-batching breakdown rows")
    ap.add_argument("--skip-breakdown", action="store_true", help="no q-chunked / q-continuous / q-fused rows")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_average = os.getloadavg()[0]  # before we add our own load

    from qsteer.data import load_dataset
    from qsteer.engines.base import SamplingParams
    from qsteer.engines.hf import HFEngine

    records = load_dataset("sentiment", limit=args.prompts)
    prompts = [r["prompt"] for r in records]
    keys = [r["id"] for r in records]
    params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)
    # Warm-ups run 4 tokens at the timed batch width: a fresh process (the Ray actor) otherwise
    # pays its first-touch allocations of a full-width KV cache inside the timed call.
    warm_params = SamplingParams(n=args.n, max_new_tokens=4, temperature=1.0, seed=args.seed + 1)

    with console.status("loading the default model"):
        engine = HFEngine()
    assert engine.dtype == torch.float32 and engine.device.type == "cpu", (engine.dtype, engine.device)
    model, eos_ids, pad_id = engine.model, engine.eos_token_ids, engine.pad_id
    ids = engine.encode(prompts)
    n_params = count_parameters(model)
    gflop_per_token = 2 * n_params["total"] / 1e9
    machine = machine_info(args.threads, load_average)
    console.print(
        f"[bold]{machine['cpu_model']}[/] · {machine['cores']} cores · torch {machine['torch']} · "
        f"transformers {machine['transformers']} · {n_params['total'] / 1e6:.1f}M params "
        f"(tied embeddings counted once: {n_params['tied_embeddings']}) · "
        f"prompt tokens {min(map(len, ids))}-{max(map(len, ids))}"
    )

    methods: dict[str, dict] = {}
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<44}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        # -- matmul roofline ------------------------------------------------------------------
        task = progress.add_task("matmul GFLOP/s", total=2)
        hidden, inter = model.config.hidden_size, model.config.intermediate_size
        rows = min(engine.max_batch_rows, args.prompts * args.n)
        matmul = {"square_2048": matmul_gflops(2048, 2048, 2048)}
        progress.advance(task)
        matmul["decode_step"] = matmul_gflops(rows, hidden, inter)
        progress.advance(task)
        kv = model.config.num_key_value_heads * (hidden // model.config.num_attention_heads)
        fusion = fused_matmuls(hidden, kv, inter, tuple(sorted({1, 16, args.slots, rows})))

        # -- warm-ups (each method once, 4 tokens) ----------------------------------------------
        task = progress.add_task("warm-up (q, a, b)", total=3)
        warm_prompts = max(1, min(len(ids), engine.max_batch_rows // args.n))
        engine.generate(ids[:warm_prompts], warm_params, keys=keys[:warm_prompts])
        progress.advance(task)
        hf_generate(model, ids[0], 1, 4, pad_id)
        progress.advance(task)
        hf_generate(model, ids[0], args.n, 4, pad_id)
        progress.advance(task)

        # -- (q) qsteer in-process ----------------------------------------------------------------
        task = progress.add_task(f"(q) qsteer hf engine, {args.prompts}x{args.n}", total=1)
        meter = CpuMeter()
        with meter.timed():
            q_out = engine.generate(ids, params, keys=keys)
        q_time = meter.seconds
        progress.advance(task)
        q_tokens = sum(len(c.token_ids) for comps in q_out for c in comps)
        methods["q"] = result(
            q_time,
            q_tokens,
            sum(len(c) for c in q_out),
            label="qsteer, in-process",
            **meter.stats(args.threads),
            stopped_at_eos=sum(c.finish_reason == "stop" for comps in q_out for c in comps),
        )

        # -- the plain loop's speed features, each on its own ------------------------------------------
        if not args.skip_breakdown:
            q_token_ids = [[c.token_ids for c in comps] for comps in q_out]
            labels = {"q-chunked": f"qsteer, {args.slots} slots, fixed chunks",
                      "q-continuous": f"qsteer, {args.slots} slots, continuous batching",
                      "q-fused": f"qsteer, {args.slots} slots, continuous + fused projections"}
            with console.status("loading the model with fused projections"):
                fused_engine = HFEngine(fuse_projections=True)
            for key, (variant, continuous) in {"q-chunked": (engine, False), "q-continuous": (engine, True),
                                               "q-fused": (fused_engine, True)}.items():
                rows_before = variant.max_batch_rows
                variant.max_batch_rows, variant.continuous_batching = args.slots, continuous
                task = progress.add_task(f"({key}) {args.slots} slots, {args.prompts}x{args.n}", total=1)
                try:
                    variant.generate(ids[:warm_prompts], warm_params, keys=keys[:warm_prompts])
                    meter = CpuMeter()
                    with meter.timed():
                        out = variant.generate(ids, params, keys=keys)
                finally:
                    variant.max_batch_rows, variant.continuous_batching = rows_before, True
                progress.advance(task)
                methods[key] = result(
                    meter.seconds,
                    sum(len(c.token_ids) for comps in out for c in comps),
                    sum(len(c) for c in out),
                    label=labels[key],
                    identical_to_q=[[c.token_ids for c in comps] for comps in out] == q_token_ids,
                    **meter.stats(args.threads),
                )
            del fused_engine

        # -- (r) the same through Ray -------------------------------------------------------------
        if not args.skip_ray:
            import ray

            from qsteer.actors.group import ActorGroup
            from qsteer.actors.policy import PolicyActor

            task = progress.add_task("(r) ray: start + load actor", total=None)
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
            group = ActorGroup(PolicyActor, role="model", replicas=1, num_cpus=1, num_threads=args.threads)
            actor_pid = group.run_all("info")[0]["pid"]  # the actor has loaded its model
            group.run("generate", ids[:warm_prompts], warm_params, keys[:warm_prompts])  # warm-up
            progress.update(task, total=1, completed=1)
            task = progress.add_task(f"(r) qsteer via Ray actor, {args.prompts}x{args.n}", total=1)
            meter = CpuMeter(actor_pid)
            with meter.timed():
                r_out = group.run("generate", ids, params, keys)
            r_time = meter.seconds
            progress.advance(task)
            r_tokens = sum(len(c.token_ids) for comps in r_out for c in comps)
            same = [[c.token_ids for c in comps] for comps in r_out] == [
                [c.token_ids for c in comps] for comps in q_out
            ]
            methods["r"] = result(
                r_time,
                r_tokens,
                sum(len(c) for c in r_out),
                label="qsteer via Ray actor",
                identical_to_q=same,
                **meter.stats(args.threads),
            )
            group.shutdown()
            ray.shutdown()

        # -- (b) transformers generate, num_return_sequences=n, one call per prompt --------------
        task = progress.add_task(f"(b) generate(num_return_sequences={args.n})", total=len(ids))
        torch.manual_seed(args.seed)
        b_tokens, b_samples, meter = 0, 0, CpuMeter()
        for prompt in ids:
            with meter.timed():
                seqs = hf_generate(model, prompt, args.n, args.max_new_tokens, pad_id)
            b_tokens += sum(count_hf_tokens(seqs, len(prompt), eos_ids))
            b_samples += seqs.shape[0]
            progress.advance(task)
        methods["b"] = result(
            meter.seconds,
            b_tokens,
            b_samples,
            label=f"HF generate, {args.n}/call",
            **meter.stats(args.threads),
        )

        # -- (a) transformers generate, one sample per call (subset) -----------------------------
        a_ids = ids[: args.a_prompts]
        task = progress.add_task(
            f"(a) generate() per sample, {len(a_ids)}x{args.a_samples}", total=len(a_ids) * args.a_samples
        )
        torch.manual_seed(args.seed)
        a_tokens, a_samples, meter = 0, 0, CpuMeter()
        for prompt in a_ids:
            for _ in range(args.a_samples):
                with meter.timed():
                    seqs = hf_generate(model, prompt, 1, args.max_new_tokens, pad_id)
                a_tokens += sum(count_hf_tokens(seqs, len(prompt), eos_ids))
                a_samples += 1
                progress.advance(task)
        methods["a"] = result(
            meter.seconds,
            a_tokens,
            a_samples,
            label="HF generate, 1/call",
            subset=f"{len(a_ids)} prompts x {args.a_samples} samples",
            **meter.stats(args.threads),
        )

    # -- roofline and ratios ---------------------------------------------------------------------
    roofline = {
        "gflop_per_token": gflop_per_token,
        "tokens_per_s": matmul["square_2048"]["gflops_best"] / gflop_per_token,
        "tokens_per_s_decode_shape": matmul["decode_step"]["gflops_best"] / gflop_per_token,
        "note": "tokens/s = matmul GFLOP/s / (2 * parameters / 1e9); square_2048 best trial is the "
        "headline roofline, decode_step the GEMM shape of one MLP projection at the decode batch",
    }
    for m in methods.values():
        m["frac_roofline"] = m["tokens_per_s"] / roofline["tokens_per_s"]
        m["frac_roofline_decode_shape"] = m["tokens_per_s"] / roofline["tokens_per_s_decode_shape"]
    q = methods["q"]
    ratios = {
        "q_over_a": q["tokens_per_s"] / methods["a"]["tokens_per_s"],
        "q_over_b": q["tokens_per_s"] / methods["b"]["tokens_per_s"],
    }
    if "q-chunked" in methods:
        ratios["continuous_over_chunked"] = methods["q-continuous"]["tokens_per_s"] / methods["q-chunked"]["tokens_per_s"]
        ratios["fused_over_continuous"] = methods["q-fused"]["tokens_per_s"] / methods["q-continuous"]["tokens_per_s"]
    if "r" in methods:
        ratios["r_over_q"] = methods["r"]["tokens_per_s"] / q["tokens_per_s"]
        ratios["ray_overhead"] = methods["r"]["seconds"] / q["seconds"] - 1
    targets = [
        (
            "qsteer / (a) tokens/s",
            ratios["q_over_a"],
            f">= {TARGET_Q_OVER_A:g}x",
            ratios["q_over_a"] >= TARGET_Q_OVER_A,
        ),
        (
            "qsteer / (b) tokens/s",
            ratios["q_over_b"],
            f">= {TARGET_Q_OVER_B:g}x",
            ratios["q_over_b"] >= TARGET_Q_OVER_B,
        ),
        (
            "qsteer fraction of roofline",
            q["frac_roofline"],
            f">= {TARGET_ROOFLINE:.0%}",
            q["frac_roofline"] >= TARGET_ROOFLINE,
        ),
    ]
    if "r" in methods:
        targets.append(
            (
                "Ray overhead (r time / q time - 1)",
                ratios["ray_overhead"],
                f"< {TARGET_RAY_OVERHEAD:.0%}",
                ratios["ray_overhead"] < TARGET_RAY_OVERHEAD,
            )
        )

    report = {
        "benchmark": "best_of_n_cpu",
        "config": {
            "dataset": "sentiment",
            "prompts": args.prompts,
            "n": args.n,
            "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "seed": args.seed,
            "model": str(engine.path),
            "dtype": "float32",
            "device": "cpu",
            "engine_max_batch_rows": engine.max_batch_rows,
            "breakdown_slots": args.slots,
            "a_subset": f"{args.a_prompts} prompts x {args.a_samples} samples",
        },
        "machine": machine,
        "parameters": n_params,
        "matmul": matmul,
        "fused_projections_matmuls": fusion,
        "roofline": roofline,
        "methods": methods,
        "ratios": ratios,
        "targets": [{"name": n, "value": v, "target": t, "met": bool(ok)} for n, v, t, ok in targets],
        "wall_seconds": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "best_of_n_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "best_of_n_cpu.md").write_text(markdown(report, targets))

    # -- summary -----------------------------------------------------------------------------------
    table = Table(title=f"Best-of-{args.n} on CPU ({machine['cpu_model']}, {args.threads} threads)")
    for col in (
        "method",
        "samples",
        "tokens",
        "seconds",
        "tokens/s",
        "samples/s",
        "% roofline",
        "CPU busy",
        "other load",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for key, m in methods.items():
        table.add_row(
            f"({key}) {m['label']}",
            str(m["samples"]),
            str(m["tokens"]),
            f"{m['seconds']:.1f}",
            f"{m['tokens_per_s']:.1f}",
            f"{m['samples_per_s']:.2f}",
            f"{m['frac_roofline']:.0%}",
            f"{m['cpu_utilisation']:.0%}",
            f"{m['other_load_cores']:.2f}",
        )
    console.print(table)
    console.print(
        f"matmul: {matmul['square_2048']['gflops_best']:.1f} GFLOP/s (2048^3), "
        f"{matmul['decode_step']['gflops_best']:.1f} GFLOP/s ({matmul['decode_step']['shape']}) -> roofline "
        f"{roofline['tokens_per_s']:.0f} tok/s ({roofline['tokens_per_s_decode_shape']:.0f} at the decode shape)"
    )
    for name, value, target, ok in targets:
        shown = (
            f"{value:+.1%}"
            if "overhead" in name
            else (f"{value:.0%}" if "roofline" in name else f"{value:.2f}x")
        )
        console.print(f"  {'[green]met[/]' if ok else '[red]MISSED[/]'}  {name}: {shown} (target {target})")
    if busy := contention_note(report):
        console.print(f"[yellow]{busy}[/]")
    console.print(f"wrote {args.out / 'best_of_n_cpu.json'} and .md · wall {report['wall_seconds']:.0f}s")


def contention_note(report: dict) -> str:
    threads = report["machine"]["torch_threads"]
    shared = [
        f"({k}) {m['cpu_utilisation']:.0%} busy, other load {m['other_load_cores']:.2f} cores"
        for k, m in report["methods"].items()
        if m["cpu_utilisation"] < 0.85 or m["other_load_cores"] > 0.25
    ]
    if not shared:
        return ""
    return (
        f"Warning: the machine was shared while timing ({'; '.join(shared)}; each method uses "
        f"{threads} threads); those numbers are pessimistic, re-run on a quiet machine."
    )


def markdown(report: dict, targets: list) -> str:
    cfg, mach, roof, mm = report["config"], report["machine"], report["roofline"], report["matmul"]
    lines = [
        f"# Best-of-N throughput on CPU — {mach['date']}",
        "",
        f"{cfg['prompts']} prompts of `sentiment` x n={cfg['n']}, {cfg['max_new_tokens']} new tokens, "
        f"temperature 1.0 (no top-k/top-p), fp32, {mach['torch_threads']} torch threads; "
        f"{mach['cpu_model']} ({mach['cores']} cores), torch {mach['torch']}, "
        f"transformers {mach['transformers']}, ray {mach['ray']}.",
        f"Model: {report['parameters']['total'] / 1e6:.1f}M parameters (tied embeddings counted once) "
        f"= {roof['gflop_per_token']:.3f} GFLOP per token.",
        "",
        "| method | samples | tokens | seconds | tokens/s | samples/s | % roofline | % decode-shape roofline | CPU busy | other load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for key, m in report["methods"].items():
        label = m["label"] + (f" ({m['subset']})" if "subset" in m else "")
        lines.append(
            f"| ({key}) {label} | {m['samples']} | {m['tokens']} | {m['seconds']:.1f} | "
            f"{m['tokens_per_s']:.1f} | {m['samples_per_s']:.2f} | {m['frac_roofline']:.0%} | "
            f"{m['frac_roofline_decode_shape']:.0%} | {m['cpu_utilisation']:.0%} | {m['other_load_cores']:.2f} |"
        )
    r = report["ratios"]
    lines += [
        "",
        f"Roofline: {mm['square_2048']['gflops_best']:.1f} GFLOP/s on {mm['square_2048']['shape']} "
        f"-> **{roof['tokens_per_s']:.0f} tokens/s**; {mm['decode_step']['gflops_best']:.1f} GFLOP/s on "
        f"{mm['decode_step']['shape']} (one MLP projection at the decode batch) -> "
        f"{roof['tokens_per_s_decode_shape']:.0f} tokens/s.",
        "",
        f"Ratios (tokens/s): q/a = {r['q_over_a']:.2f}x, q/b = {r['q_over_b']:.2f}x"
        + (f", r/q = {r['r_over_q']:.3f} (Ray overhead {r['ray_overhead']:+.1%})" if "r_over_q" in r else "")
        + ".",
    ]
    if "continuous_over_chunked" in r:
        lines += [
            "",
            f"Speed features of the plain loop, each on its own ({cfg['breakdown_slots']} batch slots for "
            f"{cfg['prompts'] * cfg['n']} rows, so rows wait for slots): continuous batching "
            f"{r['continuous_over_chunked']:.3f}x over fixed chunks; fused projections "
            f"{r['fused_over_continuous']:.3f}x over continuous batching alone. Same tokens as (q): "
            + ", ".join(f"{k} {report['methods'][k]['identical_to_q']}" for k in ("q-chunked", "q-continuous", "q-fused"))
            + ".",
        ]
    lines += [
        "",
        "Fused against separate projection matmuls (best of 5, ms): "
        + "; ".join(f"{f['rows']} rows: q/k/v {f['qkv_separate_ms']:.3f} -> {f['qkv_fused_ms']:.3f} "
                    f"({f['qkv_speedup']:.2f}x), gate/up {f['gate_up_separate_ms']:.3f} -> {f['gate_up_fused_ms']:.3f} "
                    f"({f['gate_up_speedup']:.2f}x)" for f in report["fused_projections_matmuls"]) + ".",
        "",
        "## Targets",
        "",
    ]
    for name, value, target, ok in targets:
        if "overhead" in name:
            shown = f"{value:+.1%}"
        elif "roofline" in name:
            shown = f"{value:.0%}"
        else:
            shown = f"{value:.2f}x"
        lines.append(f"- {'met' if ok else '**missed**'}: {name} = {shown} (target {target})")
    if "r" in report["methods"]:
        same = report["methods"]["r"]["identical_to_q"]
        lines += ["", f"Ray path returned token ids identical to the in-process run: {same}."]
    if busy := contention_note(report):
        lines += ["", f"**{busy}**"]
    lines += ["", "Raw numbers: `best_of_n_cpu.json`. How to read the columns: `benchmarks/README.md`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
