"""GPU check: the hf engine's conformance checks in bf16, and its Best-of-N and speculative speed against
transformers `generate`, on a CUDA machine that has only torch and transformers.

Nothing else is needed: no Ray, vLLM, Hydra, scipy or network, and not the default model's GGUF
package. The model is SmolLM2-135M's architecture (its config and its real tokenizer ship in
benchmarks/gpu_model/) with random weights drawn from a fixed seed, built into a temporary
folder. The script imports only torch, transformers and qsteer's layers below the actors
(`qsteer.lm`, `qsteer.decoding`, `qsteer.engines`; tests/test_layers.py keeps those free of Ray).

Checks (the properties of tests/engine_checks.py and tests/test_engine.py, against transformers'
own `generate` and forward on the same weights): greedy tokens, teacher-forced scores, top-k,
generated log-probabilities, per-row random streams independent of batching and of continuous
batching, stop strings, the too-long prompt, and the first token's law (chi-square). Random
weights give flat next-token laws, so near-ties are common in bf16: greedy rows may part at a
tie (counted, not failed); batching checks are also run in float32, where they must hold exactly.

Speed (bf16, temperature 1 for Best-of-N, greedy batch 1 for speculation): qsteer against
transformers `generate(num_return_sequences=n)` and `generate(prompt_lookup_num_tokens=...)`, and
as a share of the bf16 matmul roofline measured in the same run. Random weights make acceptance
rates meaningless except for the self-draft (the policy drafting for itself: every draft accepted),
which shows what the speculative machinery costs and saves at full acceptance.

Run:  python benchmarks/gpu_check.py                        (CUDA, bf16; a few minutes on one GPU)
      python benchmarks/gpu_check.py --device cpu --quick   (a smoke run anywhere: float32, 4 layers, tiny sizes)
Writes benchmarks/results/gpu_check.{json,md} (gpu_check_cpu_quick.* for a CPU run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # qsteer from this working tree, installed or not

from qsteer.engines.base import SamplingParams  # noqa: E402
from qsteer.engines.hf import HFEngine  # noqa: E402

PROMPTS = [
    "Write one sentence about the sea.",
    "Continue this review: The hotel was",
    "What is 2+2?",
    "List three colours.",
]
# A wider init than SmolLM2's 0.02 gives next-token laws less flat than uniform (top-2 logit gaps
# near 0.4 rather than 0.1), so that bf16 greedy comparisons mean something.
INIT_RANGE = 0.08


# -- the model -------------------------------------------------------------------------------------
def build_model(folder: Path, seed: int, layers: int | None = None) -> Path:
    """SmolLM2-135M's architecture with random weights, and its real tokenizer, in `folder`
    (`layers`: keep only that many decoder layers, for a quick smoke run)."""
    source = HERE / "gpu_model"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    with gzip.open(source / "tokenizer.json.gz", "rb") as packed, open(folder / "tokenizer.json", "wb") as out:
        shutil.copyfileobj(packed, out)
    config = AutoConfig.from_pretrained(folder)
    config.initializer_range = INIT_RANGE
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def reference_model(path: Path, dtype: torch.dtype, device: torch.device):
    """The same weights through transformers' own loading and attention: the independent reference."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def chi_square_pvalue(observed: list[float], expected: list[float]) -> float:
    """Pearson's chi-square goodness of fit, its p-value from the regularized upper incomplete gamma."""
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True) if e > 0)
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


# -- checks ----------------------------------------------------------------------------------------
def top2_gap(reference, ids: list[int], device) -> float:
    with torch.inference_mode():
        logits = reference(torch.tensor([ids], device=device)).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def check_greedy(engine, reference, new_tokens: int, tie: float) -> dict:
    ids = engine.encode(PROMPTS)
    ours = engine.generate(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    identical = at_tie = other = 0
    worst = []
    for prompt, (completion,) in zip(ids, ours, strict=True):
        with torch.inference_mode():
            ref = reference.generate(
                torch.tensor([prompt], device=engine.device), attention_mask=torch.ones(1, len(prompt), dtype=torch.long,
                                                                                      device=engine.device),
                max_new_tokens=new_tokens, do_sample=False, eos_token_id=engine.eos_token_ids, pad_token_id=engine.pad_id,
            )[0, len(prompt):].tolist()
        got = completion.token_ids
        if got == ref[: len(got)]:
            identical += 1
            continue
        at = next(i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b)
        gap = top2_gap(reference, prompt + ref[:at], engine.device)
        worst.append({"token": at, "top2_gap": gap})
        at_tie, other = at_tie + (gap < tie), other + (gap >= tie)
    return {"passed": other == 0, "identical_rows": identical, "parted_at_a_tie": at_tie, "parted_otherwise": other,
            "tie_threshold": tie, "divergences": worst}


def check_score(engine, reference, tolerance: float) -> dict:
    ids = engine.encode(PROMPTS)
    continuations = [engine.tokenizer(t, add_special_tokens=False)["input_ids"]
                     for t in ["The sea is calm.", "clean and quiet", "4", "Red, green and blue. Done"]]
    ours = engine.score(ids, continuations)
    error = 0.0
    for prompt, cont, got in zip(ids, continuations, ours, strict=True):
        with torch.inference_mode():
            logp = torch.log_softmax(reference(torch.tensor([prompt + cont], device=engine.device)).logits[0].float(), -1)
        want = [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(cont)]
        error = max(error, max(abs(a - b) for a, b in zip(got, want, strict=True)))
    return {"passed": error < tolerance, "max_abs_error_nats": error, "tolerance": tolerance}


def check_generated_logprobs(engine, tolerance: float) -> dict:
    ids = engine.encode(PROMPTS[:2])
    out = engine.generate(ids, SamplingParams(n=2, max_new_tokens=12, seed=1), keys=["a", "b"])
    error = 0.0
    for prompt, completions in zip(ids, out, strict=True):
        for c in completions:
            scored = engine.score([prompt], [c.token_ids])[0]
            error = max(error, max(abs(a - b) for a, b in zip(scored, c.logprobs, strict=True)))
    return {"passed": error < tolerance, "max_abs_error_nats": error, "tolerance": tolerance}


def check_topk(engine, reference, tolerance: float, tie: float) -> dict:
    ids = engine.encode(PROMPTS)
    top = engine.topk_next(ids, 5)
    error, swapped = 0.0, 0
    for prompt, items in zip(ids, top, strict=True):
        with torch.inference_mode():
            logp = torch.log_softmax(reference(torch.tensor([prompt], device=engine.device)).logits[0, -1].float(), -1)
        values, indices = logp.topk(5)
        # an order swap is allowed only between values closer than `tie`
        for (token, value), want_token, want_value in zip(items, indices.tolist(), values.tolist(), strict=True):
            error = max(error, abs(value - want_value))
            if token != want_token:
                swapped += 1
                if abs(float(logp[token]) - want_value) >= tie:
                    return {"passed": False, "max_abs_error_nats": error, "order_swaps": swapped}
    return {"passed": error < tolerance, "max_abs_error_nats": error, "tolerance": tolerance, "order_swaps": swapped}


def tokens(out) -> list[list[list[int]]]:
    return [[c.token_ids for c in r] for r in out]


def check_batching(engine, new_tokens: int) -> dict:
    """Sample j of a prompt depends only on (seed, id, j): not on n, neighbours, chunking or slots."""
    ids, keys = engine.encode(PROMPTS), ["p0", "p1", "p2", "p3"]
    params = SamplingParams(n=4, max_new_tokens=new_tokens, seed=7)
    together = tokens(engine.generate(ids, params, keys))
    again = tokens(engine.generate(ids, params, keys))
    alone = tokens(engine.generate(ids[2:3], SamplingParams(n=2, max_new_tokens=new_tokens, seed=7), keys[2:3]))
    rows = engine.max_batch_rows
    try:
        engine.max_batch_rows = 3
        streamed = tokens(engine.generate(ids, params, keys))
        engine.continuous_batching = False
        chunked = tokens(engine.generate(ids, params, keys))
    finally:
        engine.max_batch_rows, engine.continuous_batching = rows, True
    other_seed = tokens(engine.generate(ids[:1], SamplingParams(n=4, max_new_tokens=new_tokens, seed=8), keys[:1]))
    flat = lambda out: [s for r in out for s in r]  # noqa: E731
    same = lambda a, b: sum(x == y for x, y in zip(flat(a), flat(b), strict=True))  # noqa: E731
    result = {
        "rows": 16,
        "repeat_identical": same(again, together),
        "continuous_3_slots_identical": same(streamed, together),
        "fixed_chunks_of_3_identical": same(chunked, together),
        "alone_identical": sum(a == b for a, b in zip(alone[0], together[2][:2], strict=True)),
        "other_seed_differs": other_seed != together[:1],
        "samples_distinct": len({tuple(t) for t in together[0]}) > 1,
    }
    result["passed"] = (result["repeat_identical"] == result["continuous_3_slots_identical"]
                        == result["fixed_chunks_of_3_identical"] == 16 and result["alone_identical"] == 2
                        and result["other_seed_differs"] and result["samples_distinct"])
    return result


def check_stop_strings(engine, quick: bool) -> dict:
    ids = engine.encode(["Write three sentences about rain."])
    new_tokens = 12 if quick else 40
    free = engine.generate(ids, SamplingParams(n=4, max_new_tokens=new_tokens, seed=3))[0]
    letters = [ch for c in free for ch in c.text if ch.isalpha()]
    stop = max(set(letters), key=letters.count)  # the most common letter: random text holds no "."
    stopped = engine.generate(ids, SamplingParams(n=4, max_new_tokens=new_tokens, seed=3, stop=[stop]))[0]
    ok = True
    for a, b in zip(free, stopped, strict=True):
        ok &= stop not in b.text
        if stop in a.text:
            ok &= b.finish_reason == "stop" and a.text.startswith(b.text) and a.token_ids[: len(b.token_ids)] == b.token_ids
    return {"passed": bool(ok), "stop": stop}


def check_too_long_prompt(engine) -> dict:
    try:
        engine.generate([[1] * engine.context_length], SamplingParams(max_new_tokens=4), keys=["long"])
    except ValueError as err:
        return {"passed": "'long'" in str(err) and "context length" in str(err), "error": str(err)}
    return {"passed": False, "error": None}


def check_first_token_law(engine, reference, samples: int) -> dict:
    ids = engine.encode(["Name an animal."])
    temperature = 1.3
    out = engine.generate(ids, SamplingParams(n=samples, max_new_tokens=1, temperature=temperature, seed=0))
    with torch.inference_mode():
        logits = reference(torch.tensor(ids, device=engine.device)).logits[0, -1].float()
    probs = torch.softmax(logits / temperature, -1).cpu()
    counts: dict[int, int] = {}
    for c in out[0]:
        counts[c.token_ids[0]] = counts.get(c.token_ids[0], 0) + 1
    top = probs.topk(15).indices.tolist()
    observed = [counts.get(t, 0) for t in top] + [samples - sum(counts.get(t, 0) for t in top)]
    expected = [samples * probs[t].item() for t in top] + [samples * (1 - probs[top].sum().item())]
    pvalue = chi_square_pvalue(observed, expected)
    return {"passed": pvalue > 0.01, "pvalue": pvalue, "samples": samples}


def run_checks(engine, reference, quick: bool, label: str) -> dict:
    low_precision = engine.dtype in (torch.bfloat16, torch.float16)
    tie, tolerance = (0.25, 0.1) if low_precision else (1e-3, 1e-3)
    checks = {
        "greedy_matches_transformers_generate": lambda: check_greedy(engine, reference, 8 if quick else 32, tie),
        "score_matches_transformers_forward": lambda: check_score(engine, reference, tolerance),
        "generated_logprobs_are_scored_logprobs": lambda: check_generated_logprobs(engine, tolerance),
        "topk_next_is_the_top_of_the_distribution": lambda: check_topk(engine, reference, tolerance, tie),
        "samples_do_not_depend_on_batching": lambda: check_batching(engine, 6 if quick else 16),
        "stop_strings_cut_the_text": lambda: check_stop_strings(engine, quick),
        "too_long_prompt_is_refused_by_name": lambda: check_too_long_prompt(engine),
        "first_token_follows_the_model_law": lambda: check_first_token_law(engine, reference, 500 if quick else 3000),
    }
    results = {}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            results[name] = check()
        except Exception as err:  # a crash is a failed check, with its cause kept
            results[name] = {"passed": False, "error": f"{type(err).__name__}: {err}",
                             "trace": traceback.format_exc(limit=4)}
        results[name]["seconds"] = round(time.perf_counter() - started, 2)
        print(f"  [{label}] {name}: {'ok' if results[name]['passed'] else 'FAILED'}", flush=True)
    return results


# -- speed -----------------------------------------------------------------------------------------
def matmul_tflops(dtype: torch.dtype, device: torch.device, size: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)
    sync(device)
    iters, elapsed = 1, 0.0
    while elapsed < seconds:
        iters *= 2
        started = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        sync(device)
        elapsed = time.perf_counter() - started
    return 2 * size**3 * iters / elapsed / 1e12


def timed(device, fn):
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - started, out


def count_hf_tokens(sequences: torch.Tensor, prompt_len: int, eos_ids: list[int]) -> int:
    """Generated tokens per row up to and including the first EOS (later positions are padding)."""
    new = sequences[:, prompt_len:].cpu()
    total = 0
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        total += cut
    return total


def bench_best_of_n(engine, fused_engine, reference, args) -> dict:
    prompts, n, new_tokens = (2, 2, 8) if args.quick else (16, 16, 64)
    texts = [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(prompts)]
    ids, keys = engine.encode(texts), [f"b{i}" for i in range(prompts)]
    params = SamplingParams(n=n, max_new_tokens=new_tokens, seed=0)
    slots = max(2, prompts * n // 4)
    rows = {}
    engine.generate(ids[:1], SamplingParams(n=n, max_new_tokens=4, seed=1), keys[:1])  # warm-up
    baseline = None
    for name, (variant, batch_rows, continuous) in {
        "qsteer": (engine, engine.max_batch_rows, True),
        f"qsteer, {slots} slots, fixed chunks": (engine, slots, False),
        f"qsteer, {slots} slots, continuous batching": (engine, slots, True),
        f"qsteer, {slots} slots, continuous + fused projections": (fused_engine, slots, True),
    }.items():
        before = variant.max_batch_rows
        variant.max_batch_rows, variant.continuous_batching = batch_rows, continuous
        try:
            seconds, out = timed(engine.device, lambda v=variant: v.generate(ids, params, keys))
        finally:
            variant.max_batch_rows, variant.continuous_batching = before, True
        got = tokens(out)
        baseline = baseline if baseline is not None else got
        count = sum(len(c.token_ids) for r in out for c in r)
        rows[name] = {"seconds": seconds, "tokens": count, "tokens_per_s": count / seconds, "same_tokens_as_qsteer": got == baseline}
    hf_tokens, hf_seconds = 0, 0.0
    torch.manual_seed(0)
    for prompt in ids:
        def call(prompt=prompt):
            with torch.inference_mode():
                return reference.generate(
                    torch.tensor([prompt], device=engine.device),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=engine.device),
                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                    num_return_sequences=n, pad_token_id=engine.pad_id, eos_token_id=engine.eos_token_ids)
        if not hf_seconds:
            call()  # warm-up
        seconds, seqs = timed(engine.device, call)
        hf_seconds += seconds
        hf_tokens += count_hf_tokens(seqs, len(prompt), engine.eos_token_ids)
    rows[f"transformers generate, num_return_sequences={n}"] = {
        "seconds": hf_seconds, "tokens": hf_tokens, "tokens_per_s": hf_tokens / hf_seconds}
    return {"prompts": prompts, "n": n, "max_new_tokens": new_tokens, "slots": slots, "rows": rows}


def bench_speculative(engine, reference, args) -> dict:
    prompt_count, new_tokens = (1, 8) if args.quick else (4, 128)
    code = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    ids = engine.encode([code + f"# case {i}\n" for i in range(prompt_count)], chat=False)
    drafts = {"lookup-4": {"kind": "lookup", "gamma": 4}, "layerskip": {"kind": "layerskip", "gamma": 4},
              "self-draft (every draft accepted)": {"kind": "model", "gamma": 4}}
    rows: dict[str, dict] = {}
    plain_tokens = None
    for name, draft in {"qsteer plain": None, **drafts}.items():
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, speculative=draft)
        engine.generate(ids[:1], SamplingParams(max_new_tokens=4, temperature=0, speculative=draft))  # warm-up
        seconds, out = 0.0, []
        for i, prompt in enumerate(ids):  # batch 1
            s, result = timed(engine.device, lambda p=prompt, i=i, params=params: engine.generate([p], params, keys=[str(i)]))
            seconds += s
            out.append(result[0][0])
        got = [c.token_ids for c in out]
        plain_tokens = plain_tokens if plain_tokens is not None else got
        count = sum(len(t) for t in got)
        row = {"seconds": seconds, "tokens": count, "tokens_per_s": count / seconds, "same_tokens_as_plain": got == plain_tokens}
        if draft is not None:
            spec = [c.spec for c in out if c.spec]
            rounds = sum(s["rounds"] for s in spec)
            row["tokens_per_verify"] = sum(s["emitted"] for s in spec) / max(1, rounds)
        rows[name] = row
    for name, extra in {"transformers generate": {}, "transformers prompt lookup (10)": {"prompt_lookup_num_tokens": 10}}.items():
        seconds, count = 0.0, 0
        for prompt in ids:
            def call(prompt=prompt, extra=extra):
                with torch.inference_mode():
                    return reference.generate(
                        torch.tensor([prompt], device=engine.device),
                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=engine.device),
                        do_sample=False, max_new_tokens=new_tokens, pad_token_id=engine.pad_id,
                        eos_token_id=engine.eos_token_ids, **extra)
            if not seconds:
                call()
            s, seqs = timed(engine.device, call)
            seconds += s
            count += count_hf_tokens(seqs, len(prompt), engine.eos_token_ids)
        rows[name] = {"seconds": seconds, "tokens": count, "tokens_per_s": count / seconds}
    base = rows["qsteer plain"]["tokens_per_s"]
    for row in rows.values():
        row["speedup_vs_qsteer_plain"] = row["tokens_per_s"] / base
    return {"prompts": prompt_count, "max_new_tokens": new_tokens, "batch": 1, "rows": rows}


# -- the run ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu unless given")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that the script works")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --quick for a smoke run", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    started = time.perf_counter()
    folder = build_model(Path(tempfile.mkdtemp(prefix="qsteer-gpu-check-")) / "smollm2-135m-random", args.seed,
                         layers=4 if args.quick else None)
    print(f"model: {folder} (random weights, seed {args.seed}); device {device}, {dtype}", flush=True)

    engine = HFEngine(path=str(folder), dtype=dtype, device=str(device), max_batch_rows=256)
    reference = reference_model(folder, engine.dtype, device)
    report: dict = {"checks": {dtype: run_checks(engine, reference, args.quick, dtype)}}
    if engine.dtype != torch.float32:  # the batching properties again where rounding cannot hide a fault
        exact = HFEngine(path=str(folder), dtype="float32", device=str(device), max_batch_rows=256)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        report["checks"]["float32"] = {"samples_do_not_depend_on_batching": check_batching(exact, 6 if args.quick else 16)}
        del exact

    fused = HFEngine(path=str(folder), dtype=dtype, device=str(device), max_batch_rows=256, fuse_projections=True)
    print("  best-of-n ...", flush=True)
    report["best_of_n"] = bench_best_of_n(engine, fused, reference, args)
    del fused
    print("  speculative ...", flush=True)
    report["speculative"] = bench_speculative(engine, reference, args)
    parameters = sum(p.numel() for p in engine.model.parameters())  # tied embeddings once
    tflops = matmul_tflops(engine.dtype, device, 1024 if args.quick else 8192)
    roofline = tflops * 1e12 / (2 * parameters)
    for row in report["best_of_n"]["rows"].values():
        row["share_of_roofline"] = row["tokens_per_s"] / roofline
    report["roofline"] = {"matmul_tflops": tflops, "parameters": parameters, "tokens_per_s": roofline}
    report["machine"] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dtype": dtype, "quick": args.quick,
    }
    report["wall_seconds"] = time.perf_counter() - started
    failed = [f"{precision}: {name}" for precision, checks in report["checks"].items()
              for name, result in checks.items() if not result["passed"]]
    report["failed_checks"] = failed
    stem = "gpu_check" if device.type == "cuda" and not args.quick else f"gpu_check_{device.type}{'_quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    shutil.rmtree(folder.parent, ignore_errors=True)
    return 1 if failed else 0


def markdown(report: dict) -> str:
    m, roof = report["machine"], report["roofline"]
    lines = [f"# GPU check: {m['device']}, {m['dtype']}{' (quick)' if m['quick'] else ''} ({m['date']})", "",
             f"torch {m['torch']}, transformers {m['transformers']}; SmolLM2-135M architecture, random weights; "
             f"wall {report['wall_seconds']:.0f} s.", "", "## Conformance", "", "| dtype | check | result | details |",
             "|---|---|---|---|"]
    for precision, checks in report["checks"].items():
        for name, result in checks.items():
            details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                                if k not in ("passed", "trace", "divergences"))
            lines.append(f"| {precision} | {name} | {'ok' if result['passed'] else '**FAILED**'} | {details} |")
    b = report["best_of_n"]
    lines += ["", f"## Best-of-{b['n']} ({b['prompts']} prompts, {b['max_new_tokens']} new tokens, temperature 1)", "",
              f"Roofline: {roof['matmul_tflops']:.3g} TFLOP/s matmul / (2 x {roof['parameters'] / 1e6:.1f}M parameters) "
              f"= {roof['tokens_per_s']:.0f} tokens/s.", "",
              "| method | tokens | seconds | tokens/s | share of roofline | same tokens |", "|---|--:|--:|--:|--:|---|"]
    for name, row in b["rows"].items():
        lines.append(f"| {name} | {row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} | "
                     f"{row['share_of_roofline']:.1%} | {row.get('same_tokens_as_qsteer', '')} |")
    s = report["speculative"]
    lines += ["", f"## Speculative decoding (batch 1, greedy, {s['prompts']} prompts x {s['max_new_tokens']} tokens)", "",
              "| method | tokens/s | vs qsteer plain | tokens per verify | same tokens as plain |", "|---|--:|--:|--:|---|"]
    for name, row in s["rows"].items():
        per_verify = f"{row['tokens_per_verify']:.2f}" if "tokens_per_verify" in row else ""
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['speedup_vs_qsteer_plain']:.2f}x | {per_verify} | "
                     f"{row.get('same_tokens_as_plain', '')} |")
    lines += ["", "Failed checks: " + (", ".join(report["failed_checks"]) or "none") + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
