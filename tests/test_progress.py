"""Watching a run: per-role counts in the groups, progress.json during and after a run, the live view, Ray metrics.

The in-process runs use the tiny model; the counts are checked against what the workflow itself
records (its per-record stats) and what the role objects count on their side, and progress.json
is read by a second thread while the run goes on, as a user's `watch cat` would.
"""

from __future__ import annotations

import io
import json
import pickle
import threading
import time
from pathlib import Path

import pytest

from qsteer import progress as progress_module
from qsteer.actors.local import LocalReplicas, local_policy, local_reward
from qsteer.actors.roles import RewardGroup, RoleCounts
from qsteer.engines import SamplingParams
from qsteer.progress import Progress, line, render
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import run_job

FAST = ["dataset.limit=4", "generation.max_new_tokens=8", "batch_size=1", "workflow.n=2"]


def rows(out: Path) -> list[dict]:
    return [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]


class DeadActor:  # what a reward replica that cannot serve looks like to its group
    def score(self, *args):
        raise RuntimeError("the actor died before it could serve")


def test_role_groups_count_calls_errors_and_generated_tokens(tiny_engine):
    policy = local_policy(tiny_engine)
    ids = policy.encode(["Hello there", "Tell me a story"], True)
    out = policy.generate(ids, SamplingParams(max_new_tokens=6, n=3, seed=1), ["a", "b"])
    tokens = sum(len(c.token_ids) for completions in out for c in completions)
    assert 0 < tokens <= 2 * 3 * 6
    assert policy.counts.as_dict() == {"calls": 2, "errors": 0, "tokens": tokens}  # encode, then generate
    assert policy.info()[0]["calls"] == 1  # bookkeeping (info) is no call; the policy itself counts generate only

    dead = RewardGroup(LocalReplicas([DeadActor()]))
    with pytest.raises(RuntimeError, match="died"):
        dead.score(["p"], ["c"], None, {})
    assert dead.counts.as_dict() == {"calls": 1, "errors": 1, "tokens": 0}
    # a group crossing into another actor starts counting afresh there, and its copy still works
    copy = pickle.loads(pickle.dumps(RoleCounts()))
    copy.add(calls=2)
    assert copy.as_dict() == {"calls": 2, "errors": 0, "tokens": 0}


def test_progress_json_moves_during_the_run_and_matches_the_summary_at_its_end(
        compose, tiny_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module, "REFRESH_S", 0.05)

    def slow_reward(prompts, completions, **_):  # a reward service taking its time: the run spans refreshes
        time.sleep(0.3)
        return [float(len(c)) for c in completions]

    seen: list[dict] = []
    running = threading.Event()
    path = tmp_path / "progress.json"

    def watch() -> None:
        while running.is_set():
            if path.exists():
                seen.append(json.loads(path.read_text()))  # never half a file: written by rename
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    running.set()
    watcher.start()
    try:
        summary = run_job(compose(*FAST), tmp_path, roles={"policy": local_policy(tiny_engine),
                                                           "reward": local_reward(slow_reward)})
    finally:
        running.clear()
        watcher.join()
    final = json.loads(path.read_text())
    assert final["state"] == "finished" and final["workflow"] == "best_of_n"
    assert final["prompts_done"] == final["prompts_total"] == summary["num_prompts"] == 4
    assert final["record_errors"] == summary["num_errors"] == 0 and final["prompts_unfinished"] == 0
    records = rows(tmp_path)
    # the driver's calls are the workflow's own count (encode + generate per batch; one reward call)
    assert final["roles"]["policy"]["calls"] == round(sum(r["stats"]["policy_calls"] for r in records)) == 8
    assert final["roles"]["reward"]["calls"] == round(sum(r["stats"]["reward_calls"] for r in records)) == 4
    assert final["roles"]["policy"]["errors"] == final["roles"]["reward"]["errors"] == 0
    assert final["generated_tokens"] == final["roles"]["policy"]["tokens"] == summary["generated_tokens"] > 0
    assert final["tokens_per_s"] == pytest.approx(final["generated_tokens"] / final["generation_s"], rel=0.01)

    during = [s for s in seen if s["state"] == "running"]
    assert any(0 < s["prompts_done"] < 4 for s in during), [s["prompts_done"] for s in seen]
    done = [s["prompts_done"] for s in seen]
    assert done == sorted(done)  # never goes back
    assert seen[0]["state"] in ("starting", "running")


def test_failed_batches_errors_per_role_resume_and_a_stop_are_in_progress_json(compose, tiny_engine, tmp_path):
    cfg = compose(*FAST)
    policy = local_policy(tiny_engine)
    run_job(cfg, tmp_path / "dead", roles={"policy": policy, "reward": RewardGroup(LocalReplicas([DeadActor()]))})
    dead = json.loads((tmp_path / "dead" / "progress.json").read_text())
    assert dead["roles"]["reward"] == {"calls": 4, "errors": 4, "tokens": 0}
    assert dead["prompts_done"] == 0 and dead["prompts_unfinished"] == 4 and dead["state"] == "finished"
    assert "unfinished" in line(dead)

    out = tmp_path / "resumed"
    run_job(compose(*FAST, "dataset.limit=2"), out, roles={"policy": policy, "reward": local_reward(SentimentReward())})
    run_job(cfg, out, roles={"policy": policy, "reward": local_reward(SentimentReward())})
    resumed = json.loads((out / "progress.json").read_text())
    assert resumed["prompts_resumed"] == 2 and resumed["prompts_done"] == 4
    # this run's calls only, though the caller's policy group served the two runs before too
    assert resumed["roles"]["reward"]["calls"] == 2 and resumed["roles"]["policy"]["calls"] == 4

    def interrupted(prompts, completions, **_):  # Ctrl-C while the reward runs
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, tmp_path / "stopped", roles={"policy": policy, "reward": local_reward(interrupted)})
    assert json.loads((tmp_path / "stopped" / "progress.json").read_text())["state"] == "stopped"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_the_live_view_shows_prompts_tokens_and_each_roles_calls(tmp_path, terminal):
    stream = Terminal() if terminal else io.StringIO()
    policy, reward = RoleCounts(), RoleCounts()
    with Progress(tmp_path / "progress.json", workflow="best_of_n", total=4, done=1, stream=stream,
                  refresh_s=0.01) as progress:
        progress.watch({"policy": policy, "reward": reward})
        policy.add(calls=2, tokens=48)
        reward.add(calls=1, errors=1)
        progress.advance([{"id": "a", "error": None}, {"id": "b", "error": "boom"}])
        time.sleep(0.1)
    shown = stream.getvalue()
    assert "3/4 prompts" in shown and "1 errors" in shown
    if terminal:  # rich's live panel: a table row per role
        assert any(text.split() == ["policy", "2", "0", "48"] for text in _plain(shown).splitlines())
    else:  # a log gets plain lines, one per change, not one per refresh
        assert "policy 2 calls 0 errors; reward 1 calls 1 errors" in shown
        assert len(shown.splitlines()) <= 4
    final = json.loads((tmp_path / "progress.json").read_text())
    assert final["roles"] == {"policy": {"calls": 2, "errors": 0, "tokens": 48},
                              "reward": {"calls": 1, "errors": 1, "tokens": 0}}

    from rich.console import Console

    console = Console(file=io.StringIO(), width=140, force_terminal=False)
    console.print(render(final))
    assert "48" in console.file.getvalue() and "finished" in console.file.getvalue()


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


@pytest.mark.ray
def test_the_counts_reach_ray_metrics_on_the_metrics_agent(ray_session, compose, tmp_path):
    """Read back from the node's metrics agent (Prometheus text), as a Prometheus scraping it for the dashboard."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "Review the cafe.", "completion": text}) + "\n"
                            for i, text in enumerate(["Lovely place.", "Dirty and awful.", "Fine."])))
    out = tmp_path / "scored"
    run_job(compose("workflow=score", "dataset=jsonl", f"dataset.path={data}", "batch_size=1"), out)
    final = json.loads((out / "progress.json").read_text())
    assert final["prompts_done"] == 3 and final["roles"]["reward"]["calls"] == 3

    node = next(n for n in ray_session.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = {"ray_qsteer_prompts_done_total": 3.0, "ray_qsteer_role_calls_total": 3.0,
              "ray_qsteer_dataset_prompts": 3.0}
    found: dict[str, float] = {}
    deadline = time.monotonic() + 60  # the driver reports to the agent every few seconds
    while time.monotonic() < deadline and found != wanted:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted and sample.labels.get("run") == str(out):
                    assert sample.labels["workflow"] == "score"
                    if sample.name == "ray_qsteer_role_calls_total":
                        assert sample.labels["role"] == "reward"
                    found[sample.name] = sample.value
        if found != wanted:
            time.sleep(2)
    assert found == wanted
