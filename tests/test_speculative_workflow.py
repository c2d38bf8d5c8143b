"""workflow=speculative and generation.speculative end to end: Ray actors, Hydra config, result files."""

from __future__ import annotations

import json

import pytest

from qsteer.config import ConfigError, check_config
from qsteer.run import run_job

COMMON = ["dataset.limit=3", "generation.max_new_tokens=24", "cluster.dashboard=false"]


def records(path):
    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_speculative_run_is_identical_to_plain_greedy_and_reports_acceptance(ray_session, compose, tmp_path):
    summary = run_job(compose("workflow=speculative", "draft=lookup", "generation.temperature=0", *COMMON), tmp_path)
    metrics = summary["metrics"]
    assert metrics["identical_to_plain"] == 1.0
    assert metrics["speedup"] > 0 and metrics["mean_accepted_length"] >= 1
    assert 0 <= metrics["acceptance_rate"] <= 1 and metrics["speculative"]["rounds"] > 0
    for row in records(tmp_path):
        assert row["stats"]["spec"]["target_calls"] == row["stats"]["spec"]["rounds"] + 1
        assert row["stats"]["plain_wall_s"] > 0 and row["identical_to_plain"] is True


@pytest.mark.slow
def test_draft_in_its_own_actor(ray_session, compose, tmp_path):
    """draft.colocate=false: the policy actor drafts through a DraftActor (the policy's own weights here,
    so every draft token is accepted); the output is still the plain greedy output."""
    cfg = compose("workflow=speculative", "draft=model", "draft.colocate=false", "draft.gamma=3",
                  "generation.temperature=0", *COMMON)
    summary = run_job(cfg, tmp_path)
    spec = summary["metrics"]["speculative"]
    assert summary["metrics"]["identical_to_plain"] == 1.0
    assert spec["draft_calls"] > 0 and spec["accepted"] == spec["tested"]


@pytest.mark.slow
def test_best_of_n_samples_speculatively(ray_session, compose, tmp_path):
    cfg = compose("workflow=best_of_n", "workflow.n=3", "generation.speculative=layerskip", "draft.gamma=3", *COMMON)
    summary = run_job(cfg, tmp_path)
    for row in records(tmp_path):
        assert len(row["candidates"]) == 3 and row["stats"]["spec"]["rounds"] > 0
    assert "acceptance_rate" in summary["metrics"] and summary["num_errors"] == 0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["generation.speculative=maybe"], "generation.speculative"),
        (["workflow=speculative", "draft.gamma=0"], "draft.gamma"),
        (["workflow=speculative", "draft=recycle", "draft.tree=[[0],[5,1]]"], "draft.tree"),
        (["generation.speculative=true", "draft=lookup", "+draft.speed=3"], "speed"),
    ],
)
def test_draft_config_errors_name_the_key(compose, overrides, key):
    with pytest.raises(ConfigError, match=key):
        check_config(compose(*overrides))
