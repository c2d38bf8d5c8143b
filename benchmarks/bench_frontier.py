"""The reward-vs-KL frontier on the sentiment set: Best-of-N, controlled decoding, ARGS, beam search, DVTS.

Every run is a real run folder (`run_job` on in-process role groups: one hf engine for the
policy, the sentiment reward in process; no Ray, so the CPU goes to the models), written under
`--runs`; then `qsteer-report --frontier` draws them into `--out` (frontier.md/.json/.png):

  best_of_n                       N in {1, 2, 4, 16, 64} (64: about the tokens of Transfer Q*'s rollouts)
  controlled_decoding blockwise   K in {2, 4}, M = tokens / 3      (needs --value)
  controlled_decoding tokenwise   alpha in {0, 2, 8}               (needs --value)
  args (sampled, not greedy)      alpha in {0, 2, 8}
  beam_search, dvts               n in {2, 4}, beam_width = 2, steps of tokens / 3: n candidate steps
                                  per step, about n x tokens generated per prompt, Best-of-N's budget
                                  at N = n (dvts at n = 2 is one subtree: beam search at n = 2)
  the same, by the value          workflow.scorer=value            (needs --value)
  transfer_qstar (sampled)        alpha in {0, 2, 8}, k = 4, m = 2, L = tokens / 3   (needs --baseline)

`--value` is a Q-head on the policy's backbone, as `qsteer workflow=train_value` writes it
(RUN_DIR/value); without it both controlled-decoding sweeps and the value-scored searches are
skipped (said in the output).
`--baseline` is an aligned model folder (`workflow=align_baseline` writes RUN_DIR/baseline), for
direct transfer; without it Transfer Q* is skipped. Other run folders can join the report later:
`qsteer-report --frontier RUNS MORE_RUNS... --out OUT`.

`--quick` proves the pipeline in seconds: the tiny random-weight model of the tests, a random
Q-head on it, the tiny model itself as TQ*'s baseline, 2 prompts of 6 tokens; its numbers mean
nothing and go to the scratch folder.

Run:  .venv/bin/python benchmarks/bench_frontier.py --value RUN_DIR/value [--prompts 8 --tokens 24]
      .venv/bin/python benchmarks/bench_frontier.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = (0, 2, 8)
SEARCH_NS = (2, 4)  # candidate steps per prompt per step: Best-of-N's N at equal generated tokens


def sweeps(tokens: int, with_value: bool, with_baseline: bool) -> list[tuple[str, list[str]]]:
    """(run folder name, config overrides) of every run."""
    out = [(f"best_of_n_n{n}", ["workflow=best_of_n", f"workflow.n={n}"]) for n in (1, 2, 4, 16, 64)]
    if with_value:
        block = max(1, tokens // 3)
        out += [(f"cd_blockwise_k{k}", ["workflow=controlled_decoding", "workflow.mode=blockwise", f"workflow.n={k}",
                                        f"workflow.block_size={block}"]) for k in (2, 4)]
        out += [(f"cd_tokenwise_a{a}", ["workflow=controlled_decoding", "workflow.mode=tokenwise",
                                        f"workflow.alpha={a}"]) for a in ALPHAS]
    out += [(f"args_a{a}", ["workflow=args", "workflow.greedy=false", f"workflow.alpha={a}"]) for a in ALPHAS]
    step = f"workflow.block_size={max(1, tokens // 3)}"
    scorers = [("", [])] + ([("_value", ["workflow.scorer=value"])] if with_value else [])
    out += [(f"{workflow}{tag}_n{n}_w2", [f"workflow={workflow}", f"workflow.n={n}", "workflow.beam_width=2", step,
                                         *scorer])
            for workflow in ("beam_search", "dvts") for tag, scorer in scorers for n in SEARCH_NS]
    if with_baseline:
        out += [(f"tqstar_a{a}", ["workflow=transfer_qstar", "workflow.greedy=false", f"workflow.alpha={a}",
                                  "workflow.top_k=4", "workflow.rollouts=2", "workflow.rollout_sampling=sample",
                                  f"workflow.rollout_tokens={max(1, tokens // 3)}"]) for a in ALPHAS]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--value", default=None, help="a Q-head checkpoint on the policy backbone (train_value's)")
    ap.add_argument("--baseline", default=None, help="an aligned model folder for Transfer Q* (align_baseline's)")
    ap.add_argument("--runs", default=None, help="where the run folders go (default: a new temp folder)")
    ap.add_argument("--out", default=None, help="where the report goes (default: benchmarks/results/frontier_cpu; "
                    "with --quick, the runs folder)")
    ap.add_argument("--quick", action="store_true", help="the tiny random model: proves the pipeline only")
    args = ap.parse_args()
    load = os.getloadavg()[0]

    import torch
    from hydra import compose, initialize_config_module

    from qsteer.actors.local import LocalReplicas, local_policy, local_reward
    from qsteer.actors.policy import Policy
    from qsteer.actors.roles import PolicyGroup, ValueSum
    from qsteer.engines import build_engine
    from qsteer.report import frontier
    from qsteer.rewards.sentiment import SentimentReward
    from qsteer.run import run_job
    from qsteer.values import checkpoint_kind

    torch.set_num_threads(1)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="qsteer-frontier-"))
    model: list[str] = []
    value, baseline = args.value, args.baseline
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_model import build_tiny_model

        from qsteer.values.model import ValueModel

        tiny = str(build_tiny_model(runs / "tiny-model"))
        model = [f"model.path={tiny}"]
        args.prompts, args.tokens = min(args.prompts, 2), min(args.tokens, 6)
        engine = build_engine("hf", path=tiny, num_threads=1)
        head = ValueModel.on_policy_model(engine.model, "q")
        with torch.no_grad():
            head.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        value = str(runs / "random-head")
        head.save(Path(value), policy_path=tiny)
        baseline = tiny
    else:
        engine = build_engine("hf", num_threads=1)
    if value is not None and checkpoint_kind(value) != ("q", "policy"):
        raise SystemExit(f"--value {value}: holds a {checkpoint_kind(value)} value; this benchmark takes a Q-head "
                         "on the policy backbone (qsteer workflow=train_value's default)")
    reward = local_reward(SentimentReward())
    common = [*model, "progress=false", "dataset=sentiment", f"dataset.limit={args.prompts}",
              f"generation.max_new_tokens={args.tokens}"]
    plan = sweeps(args.tokens, value is not None, baseline is not None)
    if value is None:
        print("no --value: controlled decoding (blockwise and tokenwise) and value-scored search skipped")
    if baseline is None:
        print("no --baseline: Transfer Q* skipped")
    baseline_role = local_policy(build_engine("hf", path=baseline, num_threads=1)) if baseline else None
    timings = {}
    for name, overrides in plan:
        policy = Policy(engine)
        roles: dict = {"reward": reward}
        extra = []
        if value is not None and ("workflow=controlled_decoding" in overrides or "workflow.scorer=value" in overrides):
            policy.load_value_heads([(value, 1.0)])
            roles["value"] = ValueSum(PolicyGroup(LocalReplicas([policy])), None)
            extra = [f"value.path={value}"]
        if "workflow=transfer_qstar" in overrides:
            roles["baseline"] = baseline_role
            extra = [f"baseline.path={baseline}"]
        roles["policy"] = PolicyGroup(LocalReplicas([policy]))
        with initialize_config_module("qsteer.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*common, *overrides, *extra])
        started = time.perf_counter()
        summary = run_job(cfg, runs / name, roles=roles)
        timings[name] = round(time.perf_counter() - started, 2)
        print(f"{name}: mean reward {summary['mean_reward']}, {summary['generated_tokens']} tokens, "
              f"{timings[name]} s", flush=True)
    out = Path(args.out) if args.out else (runs if args.quick else RESULTS / "frontier_cpu")
    frontier([runs / name for name, _ in plan], out)
    meta = {"settings": vars(args) | {"value": value, "baseline": baseline}, "load_avg_at_start": round(load, 2),
            "wall_trusted": load < 1.5, "torch_threads": 1, "runs": str(runs), "wall_s": timings}
    (out / "frontier_settings.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"runs: {runs}\nreport: {out}")


if __name__ == "__main__":
    main()
