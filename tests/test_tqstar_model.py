"""Transfer Q* end to end on the default model, in Ray actors: a baseline made by align_baseline (TRL DPO),
then Transfer Q* with it on the sentiment reward (the issue's default-model checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsteer.run import run_job

pytestmark = [pytest.mark.ray, pytest.mark.model, pytest.mark.heavy]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_align_baseline_then_transfer_qstar_raises_the_reward(ray_session, compose, tmp_path):
    align = run_job(compose("workflow=align_baseline", "dataset.limit=8", "generation.max_new_tokens=16",
                            "workflow.batch_size=4", "workflow.learning_rate=1e-5"), tmp_path / "align")
    folder = tmp_path / "align" / "baseline"
    card = json.loads((folder / "baseline_card.json").read_text())
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert card["steps"] == len(card["loss"]) >= 1 and card["pairs"] >= 4
    assert card["reward_before"] is not None and card["reward_after"] is not None
    assert align["num_errors"] == 0

    tq = ["workflow=transfer_qstar", f"baseline.path={folder}", "dataset.limit=4", "generation.max_new_tokens=10",
          "workflow.top_k=4", "workflow.rollout_tokens=4", "batch_size=4"]
    plain = run_job(compose(*tq, "workflow.alpha=0"), tmp_path / "alpha0")
    steered = run_job(compose(*tq, "workflow.alpha=8"), tmp_path / "alpha8")
    assert steered["mean_reward"] > plain["mean_reward"]
    assert all(r["kl"] == 0 for r in rows(tmp_path / "alpha0"))  # alpha = 0 is the reference (greedy)
    records = rows(tmp_path / "alpha8")
    for r in records:
        tokens = r["candidates"][0]["num_tokens"]
        assert r["stats"]["rollouts"] == tokens * 4  # k x m per step, m = 1
        assert r["stats"]["baseline_tokens"] <= tokens * 4 * 4  # L each, fewer at EOS
    # one batch: every step's rollouts of all four prompts were one baseline call
    steps = max(r["candidates"][0]["num_tokens"] for r in records)
    assert sum(r["stats"]["baseline_calls"] for r in records) == pytest.approx(steps)
