"""The `qsteer` command itself, in subprocesses: a killed run resumes, sweeps get a report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qsteer.cli import print_summary
from qsteer.run import run_job

QSTEER = [sys.executable, "-m", "qsteer.cli"]
COMMON = ["cluster.dashboard=false", "progress=false", "generation.max_new_tokens=16", "workflow.n=2"]


def ids_and_outputs(path: Path) -> list[tuple[str, str, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((r["id"], r["output"], r["reward"]) for r in rows)


@pytest.mark.ray
@pytest.mark.model
def test_killed_run_resumes_to_the_uninterrupted_result(ray_session, compose, tmp_path):
    overrides = [*COMMON, "dataset.limit=6", "batch_size=1"]
    run_job(compose(*overrides), tmp_path / "whole")

    out = tmp_path / "resumed"
    results = out / "results.jsonl"
    proc = subprocess.Popen([*QSTEER, *overrides, f"hydra.run.dir={out}"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(results.read_text().splitlines())
    assert 2 <= done_before < 6
    with results.open("a") as f:  # a line torn by the kill
        f.write('{"id": "sent-005", "prompt": "Contin')

    rerun = subprocess.run([*QSTEER, *overrides, f"hydra.run.dir={out}"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = ids_and_outputs(results)
    assert [i for i, _, _ in resumed] == sorted({i for i, _, _ in resumed})  # every id exactly once
    assert resumed == ids_and_outputs(tmp_path / "whole" / "results.jsonl")


@pytest.mark.ray
@pytest.mark.model
def test_multirun_sweep_writes_one_table_and_one_plot(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [*QSTEER, "-m", "workflow.n=1,3", "dataset.limit=3", "generation.max_new_tokens=12",
         "cluster.dashboard=false", "progress=false", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (sweep / "sweep.md").read_text()
    assert "workflow.n" in table and table.count("\n") == 4  # header, rule, two runs
    assert (sweep / "reward_vs_n.png").stat().st_size > 1000
    assert "data:image/png;base64," in (sweep / "report.html").read_text()  # the page, with the plot inside
    for point in ("0", "1"):  # each point's live numbers, final
        progress = json.loads((sweep / point / "progress.json").read_text())
        assert progress["state"] == "finished" and progress["prompts_done"] == 3
    rows = json.loads((sweep / "sweep.json").read_text())
    assert [r["workflow.n"] for r in rows] == [1, 3]
    assert rows[1]["mean_reward"] >= rows[0]["mean_reward"]
    report = subprocess.run([sys.executable, "-m", "qsteer.report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0 and "workflow.n" in report.stdout


@pytest.mark.slow
def test_bad_input_exits_with_a_message_naming_the_key(tmp_path):
    proc = subprocess.run([*QSTEER, "workflow.n=-2", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "workflow.n must be an integer >= 1, got -2" in proc.stderr


def test_summary_prints_the_run_folder_whole_on_its_own_line(capsys, tmp_path):
    out = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8)  # wider than any terminal's line
    summary = {"workflow": "best_of_n", "num_prompts": 2, "num_errors": 0, "mean_reward": 0.5,
               "generated_tokens": 10, "wall_s": 1.0, "tokens_per_s": 10.0, "metrics": {}}
    print_summary(summary, out)
    assert f"run folder: {out}" in capsys.readouterr().err.splitlines()
