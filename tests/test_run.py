"""run_job without Ray: the in-process role groups on the tiny model, and the checks before any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsteer.actors.local import local_policy, local_reward
from qsteer.config import ConfigError
from qsteer.data import DatasetError
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import run_job

FAST = ["dataset.limit=4", "generation.max_new_tokens=8", "batch_size=2"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def roles(tiny_engine):
    return {"policy": local_policy(tiny_engine), "reward": local_reward(SentimentReward())}


def test_in_process_run_writes_the_contract_files_and_resumes(compose, roles, tmp_path):
    summary = run_job(compose("workflow.n=2", *FAST), tmp_path, roles=roles)
    assert (tmp_path / "config.yaml").read_text().startswith("workflow:")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    first = rows(tmp_path)
    assert [r["id"] for r in first] == ["sent-000", "sent-001", "sent-002", "sent-003"]
    assert summary["num_prompts"] == 4 and summary["num_errors"] == 0
    assert summary["generated_tokens"] == sum(c["num_tokens"] for r in first for c in r["candidates"])
    assert summary["metrics"]["policy_replica_calls"] == [2]  # two batches of two prompts
    resumed = run_job(compose("workflow.n=2", *FAST, "dataset.limit=6"), tmp_path, roles=roles)
    assert rows(tmp_path)[:4] == first and resumed["num_prompts"] == 6


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["workflow.n=0"], "workflow.n"),
        (["generation.temperature=-1"], "generation.temperature"),
        (["generation.top_p=0"], "generation.top_p"),
        (["workflow.aggregate=best"], "workflow.aggregate"),
        (["dataset=jsonl"], "dataset.path"),
        (["reward=callable"], "reward.target"),
        (["reward=callable", "reward.target=no_such_module:fn"], "reward.target"),
        (["model.engine=tgi"], "model.engine"),
    ],
)
def test_config_errors_name_the_key_before_anything_loads(compose, tmp_path, overrides, key):
    import ray

    was_running = ray.is_initialized()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_job(compose(*overrides), tmp_path)
    assert ray.is_initialized() == was_running  # failed before connecting to Ray
    assert not (tmp_path / "results.jsonl").exists()


def test_bad_dataset_line_names_file_and_line(compose, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "there"}\n{"id": "c", prompt}\n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl:3"):
        run_job(compose("dataset=jsonl", f"dataset.path={data}"), tmp_path / "out")
