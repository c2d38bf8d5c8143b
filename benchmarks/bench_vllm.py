"""vLLM engine throughput vs the hf engine vs raw `vllm.LLM`, and the Ray overhead on the vLLM path.

Best-of-16 on sentiment prompts, 64 new tokens, temperature 1, the default model in fp32, all
measured in one run. vLLM runs in eager mode (`enforce_eager=True`): its torch.compile start-up
costs ~95 s on this CPU and is what a short job would pay. Writes results/vllm_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def count(outputs) -> int:
    return sum(len(c.token_ids) for per_prompt in outputs for c in per_prompt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    import ray
    import torch
    from rich.console import Console
    from rich.table import Table

    from qsteer.actors.group import ActorGroup
    from qsteer.actors.policy import PolicyActor
    from qsteer.data import load_dataset
    from qsteer.engines.base import SamplingParams
    from qsteer.engines.hf import HFEngine
    from qsteer.engines.vllm import VLLMEngine

    console = Console()
    records = load_dataset("sentiment", limit=args.prompts)
    keys = [r["id"] for r in records]
    params = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    warm = SamplingParams(n=2, max_new_tokens=4)
    rows: dict[str, dict] = {}

    def record(name: str, tokens: int, seconds: float) -> None:
        rows[name] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                      "samples_per_s": round(args.prompts * args.n / seconds, 2)}
        console.print(f"{name}: {rows[name]}")

    torch.set_num_threads(2)
    hf = HFEngine()
    ids = hf.encode([r["prompt"] for r in records])
    hf.generate(ids[:1], warm)
    out, seconds = timed(lambda: hf.generate(ids, params, keys))
    record("hf engine, in-process", count(out), seconds)

    with console.status("starting vLLM (in-process)"):
        engine = VLLMEngine(enforce_eager=True)
    engine.generate(ids[:1], warm)
    out, seconds = timed(lambda: engine.generate(ids, params, keys))
    record("vllm engine, in-process", count(out), seconds)

    import vllm

    raw_params = vllm.SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_new_tokens, seed=0,
                                     stop_token_ids=engine.eos_token_ids)
    prompts = [vllm.TokensPrompt(prompt_token_ids=p) for p in ids]
    raw, seconds = timed(lambda: engine.llm.generate(prompts, raw_params, use_tqdm=False))
    record("raw vllm.LLM.generate", sum(len(c.token_ids) for r in raw for c in r.outputs), seconds)
    engine.close()

    ray.init(include_dashboard=False)
    with console.status("starting vLLM in a Ray policy actor"):
        group = ActorGroup(PolicyActor, role="model", replicas=1, num_cpus=1, engine="vllm", enforce_eager=True)
        group.run_all("info")
    group.run("generate", ids[:1], warm, keys[:1])
    out, seconds = timed(lambda: group.run("generate", ids, params, keys))
    record("vllm engine, Ray actor", count(out), seconds)
    group.shutdown()
    ray.shutdown()

    base = rows["vllm engine, in-process"]["tokens_per_s"]
    table = Table(title=f"Best-of-{args.n}, {args.prompts} prompts, {args.max_new_tokens} tokens, CPU fp32")
    for col in ("method", "tokens", "seconds", "tokens/s", "samples/s", "vs vllm engine"):
        table.add_column(col, justify="left" if col == "method" else "right")
    lines = ["| method | tokens | seconds | tokens/s | samples/s | vs vllm engine |", "|---|--:|--:|--:|--:|--:|"]
    for name, r in rows.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}x"
        table.add_row(name, str(r["tokens"]), str(r["seconds"]), str(r["tokens_per_s"]), str(r["samples_per_s"]), ratio)
        lines.append(f"| {name} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | {r['samples_per_s']} | {ratio} |")
    console.print(table)
    ray_overhead = rows["vllm engine, Ray actor"]["seconds"] / rows["vllm engine, in-process"]["seconds"] - 1
    RESULTS.mkdir(exist_ok=True)
    report = {"args": vars(args), "rows": rows, "ray_overhead": round(ray_overhead, 4),
              "machine": {"processor": platform.processor(), "torch": torch.__version__, "vllm": vllm.__version__},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (RESULTS / "vllm_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "vllm_cpu.md").write_text(
        f"# vLLM engine on CPU — {report['date']}\n\n" + "\n".join(lines)
        + f"\n\nRay overhead on the vLLM path (actor time / in-process time - 1): {ray_overhead:+.1%}.\n"
    )
    console.print(f"Ray overhead on the vLLM path: {ray_overhead:+.1%}")


if __name__ == "__main__":
    main()
