"""Faults on a real 2-node Ray cluster (a head and a worker started with `ray start`, as in test_cluster.py).

Three cases, each compared record for record with an uninterrupted run of the same command and seed:
- a policy actor's process is killed mid-run (its pid read from Ray's state API): Ray restarts it
  (`model.max_restarts`) and retries its calls (`max_task_retries`), the run completes, every prompt
  appears once, and the restarted process serves the later calls;
- the driver is killed (SIGKILL: no cleanup at all) and the same command is run again into the same
  folder: it resumes, and the final results equal the uninterrupted run's;
- the worker node dies (its raylet and every process under it killed) while it holds one of two policy
  replicas: the replica restarts on the head, the run finishes there, and nothing written is lost.
Each record has its own random streams (seed, prompt id, sample index), so which process, replica or
run drew a record does not change it; every run here uses one torch thread per actor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cluster import Cluster, node_env

pytestmark = [pytest.mark.ray, pytest.mark.heavy]

REPO = Path(__file__).resolve().parent.parent
# 72 prompts, one per batch: long enough to be killed mid-run, every batch the same whoever runs it
ARGS = ["progress=false", "dataset.limit=72", "batch_size=1", "workflow.n=3", "generation.max_new_tokens=32",
        "model.num_threads=1", "model.num_cpus=0.5", "seed=5"]


@pytest.fixture(scope="module")
def cluster():
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="qsf", dir="/tmp"))  # short: Ray's socket paths live under it
    started = None
    try:
        started = Cluster(root)
        yield started
    finally:
        Cluster.stop(started or type("Partial", (), {"root": root})())
        shutil.rmtree(root, ignore_errors=True)


def command(cluster: Cluster, tiny_path: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qsteer.cli", f"cluster.address={cluster.gcs}", f"model.path={tiny_path}", *ARGS,
            *extra, f"hydra.run.dir={out}"]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=node_env(PYTHONPATH=str(REPO)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return stderr


def lines(out: Path) -> list[str]:
    """The complete lines of the run's results (a line being written, or cut by a kill, is left out)."""
    path = out / "results.jsonl"
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].splitlines()


def wait_for_lines(proc: subprocess.Popen, out: Path, count: int, timeout: float = 300) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        written = lines(out)
        if len(written) >= count:
            return written
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before writing {count} records: {finish(proc)[-3000:]}")


def outcome(out: Path) -> dict[str, tuple]:
    """What a record's result is, by id (not its timings): output, reward, error, every candidate."""
    rows = [json.loads(line) for line in lines(out)]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a prompt was written twice"
    return {r["id"]: (r["output"], r["reward"], r["error"],
                      [(c["text"], c["reward"], c["num_tokens"]) for c in r["candidates"]]) for r in rows}


def newest_job(cluster: Cluster) -> int:
    """The number of the newest job the cluster has seen (a job id is a little-endian counter), or -1."""
    return cluster.state("""
        jobs = [int.from_bytes(bytes.fromhex(j.job_id), "little") for j in list_jobs(address=ADDRESS) if j.job_id]
        print(json.dumps(max(jobs, default=-1)))
    """)


def policy_actors(cluster: Cluster, after: int, min_count: int = 1, timeout: float = 120) -> list[dict]:
    """The alive PolicyActors of the first job newer than `after` (the run just started), from Ray's state API."""
    deadline = time.time() + timeout
    while True:
        actors = cluster.state(f"""
            from ray.util.state import list_nodes
            heads = {{n.node_id for n in list_nodes(address=ADDRESS) if n.is_head_node}}
            actors = list_actors(address=ADDRESS, filters=[("class_name", "=", "PolicyActor"), ("state", "=", "ALIVE")],
                                 detail=True, limit=1000)
            print(json.dumps([{{"pid": a.pid, "node_id": a.node_id, "on_head": a.node_id in heads,
                                "placement_group_id": a.placement_group_id}}
                              for a in actors if int.from_bytes(bytes.fromhex(a.job_id), "little") > {after}]))
        """)
        if len(actors) >= min_count and all(a["pid"] for a in actors):
            return actors
        assert time.time() < deadline, f"no {min_count} alive policy actor(s) within {timeout} s: {actors}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(cluster, tiny_path, tmp_path_factory) -> dict[str, tuple]:
    """The uninterrupted run every fault case is compared with."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(cluster, tiny_path, out), env=node_env(PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = outcome(out)
    assert len(result) == 72
    return result


def test_a_killed_policy_actor_is_restarted_and_the_run_completes_with_the_same_results(
        cluster, tiny_path, tmp_path, reference):
    out = tmp_path / "run"
    job = newest_job(cluster)
    proc = start(command(cluster, tiny_path, out))
    [actor] = policy_actors(cluster, job)
    before = wait_for_lines(proc, out, 2)
    os.kill(actor["pid"], signal.SIGKILL)
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert len(before) < 72, "the run ended before the kill"
    assert lines(out)[:len(before)] == before  # nothing written was rewritten
    assert outcome(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_errors"] == 0 and "unfinished" not in summary["metrics"]
    assert summary["metrics"]["policy_replicas_restarted"] == 1
    [pid] = summary["metrics"]["actors_started"]["policy_pids"]
    assert pid != actor["pid"]  # the run's last calls went to the restarted process ...
    assert summary["metrics"]["policy_replica_calls"][0] >= 1  # ... which served calls (counted in it)


def test_a_killed_driver_rerun_into_the_same_folder_ends_with_the_uninterrupted_results(
        cluster, tiny_path, tmp_path, reference):
    out = tmp_path / "run"
    proc = start(command(cluster, tiny_path, out))
    wait_for_lines(proc, out, 3)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, no cleanup: its actors die with its job
    finish(proc)
    before = lines(out)
    assert 3 <= len(before) < 72 and not (out / "summary.json").exists()
    rerun = subprocess.run(command(cluster, tiny_path, out), env=node_env(PYTHONPATH=str(REPO)),
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert lines(out)[:len(before)] == before  # resumed after them, not redone
    assert outcome(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 72 and summary["num_errors"] == 0


def kill_node_of(pid: int) -> list[int]:
    """Kill the node that runs the worker process `pid`: its raylet (the worker's parent) and every process
    under it (workers, agents), at once, as when the machine goes away. The pids killed."""
    import psutil

    raylet = psutil.Process(pid).parent()
    assert "raylet" in " ".join(raylet.cmdline()), raylet.cmdline()
    doomed = [raylet, *raylet.children(recursive=True)]
    for proc in doomed:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in doomed]


def test_a_dead_worker_node_moves_its_replica_to_the_head_and_the_run_finishes_there(
        cluster, tiny_path, tmp_path, reference):
    """Last in this module: the worker node stays dead. Two policy replicas spread over the nodes (SPREAD:
    preferably apart, so Ray may move a bundle to a node that already holds one)."""
    out = tmp_path / "run"
    job = newest_job(cluster)
    proc = start(command(cluster, tiny_path, out, "model.replicas=2",
                         "cluster.placement=[{roles: [policy], strategy: SPREAD}]"))
    actors = policy_actors(cluster, job, min_count=2)
    [on_worker] = [a for a in actors if not a["on_head"]]
    before = wait_for_lines(proc, out, 2)
    kill_node_of(on_worker["pid"])
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert len(before) < 72, "the run ended before the node died"
    assert lines(out)[:len(before)] == before  # nothing already written was lost or rewritten
    assert outcome(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_errors"] == 0 and summary["metrics"]["policy_replicas_restarted"] == 1
    assert on_worker["pid"] not in summary["metrics"]["actors_started"]["policy_pids"]
