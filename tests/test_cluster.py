"""qsteer on a real 2-node Ray cluster: a head and a worker started with `ray start` on this machine.

Jobs go through the Jobs API (`JobSubmissionClient`, which `ray job submit` calls), in both forms:
the code uploaded as the job's working dir, and qsteer installed on the nodes. The nodes are started without
this tree on their PYTHONPATH, so they hold the venv's installed qsteer (an editable install of
another checkout): a job can only run this tree's code from what it uploads or names.
One cluster serves the whole module; its processes are found by its own temp dir and ended by
pid, never with a global `ray stop` (other Ray instances may run beside it).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.heavy]

REPO = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)


def free_block(size: int) -> int:
    """The first port of `size` consecutive free ports."""
    for base in range(31000, 60000, 211):
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports")


def node_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    # the `ray` and `qsteer` commands of this venv, as on a node where they are installed
    return {**env, "PATH": BIN + os.pathsep + env.get("PATH", ""), "RAY_AUTH_MODE": "token", **extra}


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        base = free_block(240)
        self.gcs = f"127.0.0.1:{base}"
        self.dashboard = f"http://127.0.0.1:{base + 1}"
        ports = iter(range(base + 2, base + 40))
        temp = ["--temp-dir", str(root / "ray"), "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                "--num-cpus", "1", "--object-store-memory", str(100 * 2**20)]

        def own_ports() -> list[str]:
            return [f"--{name}={next(ports)}" for name in (
                "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]

        self.start(["--head", f"--port={base}", f"--dashboard-port={base + 1}", "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={next(ports)}", f"--min-worker-port={base + 40}",
                    f"--max-worker-port={base + 139}", "--resources", '{"head_node": 1}', *own_ports(), *temp])
        self.start([f"--address={self.gcs}", f"--min-worker-port={base + 140}", f"--max-worker-port={base + 239}",
                    "--resources", '{"worker_node": 1}', *own_ports(), *temp])

    def start(self, args: list[str]) -> None:
        proc = subprocess.run([f"{BIN}/ray", "start", *args], env=node_env(), capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    def job(self, *qsteer_args: str, working_dir: Path | None = None, runtime_env: dict | None = None) -> dict:
        """Submit `qsteer ARGS` through the Jobs API (what `ray job submit` calls), wait for it to end, and
        return its status and logs. Polled, not tailed: tailing's websocket drops on a loaded machine."""
        env = dict(runtime_env or {})
        if working_dir is not None:
            env["working_dir"] = str(working_dir)
        script = f"""
            import json, time
            from ray.job_submission import JobSubmissionClient, JobStatus
            client = JobSubmissionClient({self.dashboard!r})
            job = client.submit_job(entrypoint={shlex.join(["qsteer", "progress=false", *qsteer_args])!r},
                                    runtime_env={env!r})
            while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                time.sleep(1)
            print(json.dumps({{"status": str(client.get_job_status(job).value), "logs": client.get_job_logs(job)}}))
        """
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=node_env(), capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def state(self, script: str) -> object:
        """Run a script against Ray's state API in its own process; its last stdout line as JSON."""
        code = f"import json\nfrom ray.util.state import list_actors, list_jobs\nADDRESS = {self.dashboard!r}\n"
        proc = subprocess.run([sys.executable, "-c", code + textwrap.dedent(script)], env=node_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        import psutil

        mine = [p for p in psutil.process_iter(["cmdline"]) if str(self.root) in " ".join(p.info["cmdline"] or [])]
        for proc in mine:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(mine, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def cluster():
    # a short root: Ray's unix sockets live under it, and their paths must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="qsc", dir="/tmp"))
    started = None
    try:
        started = Cluster(root)
        yield started
    finally:
        if started is not None:
            started.stop()
        else:  # a node that did start must not outlive a failed start
            Cluster.stop(type("Partial", (), {"root": root})())
        shutil.rmtree(root, ignore_errors=True)


TINY = ["dataset.limit=2", "workflow.n=2", "batch_size=1", "generation.max_new_tokens=4", "model.num_threads=1"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_job_with_its_working_dir_spreads_the_policy_over_both_nodes(cluster, tiny_path, tmp_path):
    """`ray job submit --working-dir DIR -- qsteer ...`: the driver and every actor import qsteer and the
    user's reward module from DIR, and a STRICT_SPREAD placement puts one policy replica on each node."""
    work = tmp_path / "work"
    shutil.copytree(REPO / "qsteer", work / "qsteer", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "my_reward.py").write_text("def length(prompts, completions, **kw):\n"
                                       "    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "out"  # shared storage on a real cluster; here both nodes see /tmp
    proc = cluster.job("cluster.address=auto", f"model.path={tiny_path}", *TINY, "model.replicas=2",
                       "model.num_cpus=0.5", "reward=callable", "reward.target=my_reward:length",
                       "cluster.placement=[{roles: [policy], strategy: STRICT_SPREAD}]", f"hydra.run.dir={out}",
                       working_dir=work)
    assert proc["status"] == "SUCCEEDED", proc["logs"][-4000:]
    records = rows(out)
    assert len({r["id"] for r in records}) == len(records) == 2
    for r in records:
        assert [c["reward"] for c in r["candidates"]] == [float(len(c["text"])) for c in r["candidates"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_errors"] == 0 and len(summary["metrics"]["policy_replica_calls"]) == 2
    placed = cluster.state("""
        jobs = {j.submission_id: j.job_id for j in list_jobs(address=ADDRESS)}
        actors = list_actors(address=ADDRESS, filters=[("class_name", "=", "PolicyActor")], detail=True, limit=1000)
        print(json.dumps([[a.job_id, a.node_id, a.placement_group_id] for a in actors]))
    """)
    newest = max(placed, key=lambda a: a[0])[0]  # this module's jobs run one after another
    mine = [a for a in placed if a[0] == newest]
    assert len(mine) == 2
    assert len({node for _, node, _ in mine}) == 2, mine  # one replica on each node
    assert all(group for _, _, group in mine)  # inside the placement group


def test_a_job_with_qsteer_installed_on_the_nodes_and_no_address_joins_its_cluster(cluster, tiny_path, tmp_path):
    """The README's form (no working dir): the nodes' own qsteer runs. Here the nodes' PYTHONPATH names this
    tree, standing for an installed package. Without cluster.address the job's driver joins the cluster
    running it (it used to start a private Ray inside the job, whose actors could not fetch the job's
    runtime_env)."""
    out = tmp_path / "out"
    proc = cluster.job(f"model.path={tiny_path}", *TINY, "model.num_cpus=0.5", f"hydra.run.dir={out}",
                       runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    assert proc["status"] == "SUCCEEDED", proc["logs"][-4000:]
    assert len(rows(out)) == 2 and json.loads((out / "summary.json").read_text())["num_errors"] == 0


def test_dry_run_against_the_cluster_plans_and_refuses_without_ray_auth_mode(cluster, tmp_path):
    """Joining by an explicit address from a shell without RAY_AUTH_MODE (Ray 2.60 clusters use tokens):
    qsteer enables token auth as ray.init("auto") does; the plan names both nodes; an impossible one is
    refused naming the role, before any actor starts."""
    env = {k: v for k, v in node_env(PYTHONPATH=str(REPO)).items() if k != "RAY_AUTH_MODE"}
    base = [sys.executable, "-m", "qsteer.cli", "cluster.dry_run=true", f"cluster.address={cluster.gcs}",
            "model.num_cpus=0.5", "model.path=/nonexistent/model", f"hydra.run.dir={tmp_path / 'never'}"]
    spread = "cluster.placement=[{roles: [policy], strategy: STRICT_SPREAD}]"
    proc = subprocess.run([*base, "model.replicas=2", spread], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("policy")]
    assert len(lines) == 2 and "node 0" in lines[0] and "node 1" in lines[1]
    assert "can hold this plan" in proc.stdout
    proc = subprocess.run([*base, "model.replicas=3", spread], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cluster.placement[0] (roles policy): bundle 2" in proc.stderr
    assert not list((tmp_path / "never").glob("*.json*"))  # Hydra made the folder; qsteer wrote nothing in it


def test_a_warm_sweep_loads_the_policy_once_and_its_actors_can_be_listed_and_stopped(cluster, tiny_path, tmp_path):
    """`qsteer -m ... cluster.warm=true`: 3 sweep points against one set of actors (the first point starts
    them, the others find them by name: same processes); they outlive the sweep until stopped."""
    env = node_env(PYTHONPATH=str(REPO))
    sweep = subprocess.run(
        [sys.executable, "-m", "qsteer.cli", "-m", "progress=false", f"cluster.address={cluster.gcs}",
         "cluster.warm=true", f"model.path={tiny_path}", "dataset.limit=1", "generation.max_new_tokens=4",
         "model.num_cpus=0.5", "model.num_threads=1", "workflow.n=1,2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        env=env, capture_output=True, text=True, timeout=400)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    started = [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())["metrics"]["actors_started"]
               for i in range(3)]
    assert [(s["policy"], s["reward"]) for s in started] == [(1, 1), (0, 0), (0, 0)]  # weights loaded once
    assert len({tuple(s["policy_pids"]) for s in started}) == 1  # every point served by the same process
    assert (tmp_path / "sweep" / "sweep.md").exists()  # one table over the sweep

    def warm(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "qsteer.cluster.warm", *args, "--address", cluster.gcs],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split("\n")[:-1]

    names = warm("list")
    assert sorted(n.split("-")[2] for n in names) == ["model", "reward"]  # the policy group is model=
    assert warm("stop") == [f"stopped {n}" for n in names]
    assert warm("list") == []


def test_warm_actors_with_a_placement_live_in_a_detached_placement_group_that_stop_removes(
        cluster, tiny_path, tmp_path):
    """`cluster.warm=true` with `cluster.placement`: the warm policy replicas start in the bundles of a
    detached, named placement group (one per node: STRICT_SPREAD); the next sweep point finds the group
    and the actors by name; `python -m qsteer.cluster.warm` lists both and `stop` removes both."""
    env = node_env(PYTHONPATH=str(REPO))
    sweep = subprocess.run(
        [sys.executable, "-m", "qsteer.cli", "-m", "progress=false", f"cluster.address={cluster.gcs}",
         "cluster.warm=true", "cluster.placement=[{roles: [policy], strategy: STRICT_SPREAD}]", "model.replicas=2",
         f"model.path={tiny_path}", "dataset.limit=2", "generation.max_new_tokens=4", "model.num_cpus=0.5",
         "model.num_threads=1", "workflow.n=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        env=env, capture_output=True, text=True, timeout=400)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    started = [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())["metrics"]["actors_started"]
               for i in range(2)]
    assert [s["policy"] for s in started] == [2, 0]  # the second point reused both replicas
    assert len({tuple(s["policy_pids"]) for s in started}) == 1
    placed = cluster.state("""
        from ray.util.state import list_placement_groups
        actors = list_actors(address=ADDRESS, filters=[("class_name", "=", "PolicyActor"), ("state", "=", "ALIVE")],
                             detail=True, limit=1000)
        groups = {g.placement_group_id: [g.name, g.state, g.is_detached]
                  for g in list_placement_groups(address=ADDRESS, detail=True, limit=1000)}
        print(json.dumps([[a.name, a.node_id, groups.get(a.placement_group_id)] for a in actors
                          if (a.name or "").startswith("qsteer-warm-")]))
    """)
    assert len(placed) == 2 and len({node for _, node, _ in placed}) == 2, placed  # one replica per node
    [(group_name, state, detached)] = {tuple(group) for _, _, group in placed}  # both in one group
    assert group_name.startswith("qsteer-warm-pg-") and state == "CREATED" and detached

    def warm(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "qsteer.cluster.warm", *args, "--address", cluster.gcs],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split("\n")[:-1]

    names = warm("list")
    assert group_name in names
    assert sorted(name for name, _, _ in placed) == sorted(n for n in names if n.startswith("qsteer-warm-model-"))
    assert warm("stop") == [f"stopped {n}" for n in names]
    assert warm("list") == []
    states = cluster.state(f"""
        from ray.util.state import list_placement_groups
        print(json.dumps([g.state for g in list_placement_groups(address=ADDRESS, limit=1000) if g.name == {group_name!r}]))
    """)
    assert states == ["REMOVED"]
