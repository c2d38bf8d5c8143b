"""workflow=ctrl_align on the default model: a short CTRL run (TRL's RLOOTrainer, calibrated sentiment
reward) raises the mean calibrated reward of its samples with a finite KL, and the saved model runs in
workflow=best_of_n. In-process role groups (no Ray) keep it under two minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import json
import math

import pytest

from qsteer.actors.local import local_policy, local_reward
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import run_job

pytestmark = [pytest.mark.model, pytest.mark.heavy]


def test_short_ctrl_run_raises_the_calibrated_reward_and_its_model_runs_best_of_n(compose, engine, tmp_path):
    cfg = compose(
        "workflow=ctrl_align", "reward=calibrated", "dataset.limit=2", "generation.max_new_tokens=12",
        "reward.num_reference=16", f"reward.cache={tmp_path / 'cache'}", "workflow.steps=6",
        "workflow.learning_rate=1e-4", "workflow.beta=0.01", "workflow.eval_samples=8", "workflow.eval_n=[1,4]",
    )
    roles = {"policy": local_policy(engine), "reward": local_reward(SentimentReward())}
    summary = run_job(cfg, tmp_path / "ctrl", roles=roles)
    metrics = summary["metrics"]
    assert summary["num_errors"] == 0 and summary["num_prompts"] == 2
    # the trained model's fresh samples rank above the reference's own (0.5 in expectation)
    assert metrics["mean_calibrated"] > metrics["reference_mean_calibrated"]
    assert metrics["win_rate_sample"] > 0.5
    assert math.isfinite(metrics["kl_k1"]) and math.isfinite(metrics["kl_k3"]) and metrics["kl_k3"] > 0
    card = json.loads((tmp_path / "ctrl" / "model" / "training_card.json").read_text())
    assert card["steps"] == 6 and card["kl_estimator"].startswith("k1")
    assert all(math.isfinite(v) for v in card["kl_per_token"])
    assert (tmp_path / "ctrl" / "model" / "training_curves.png").exists()

    from qsteer.engines import build_engine

    model = str(tmp_path / "ctrl" / "model")
    best = compose("workflow=best_of_n", "workflow.n=2", "dataset.limit=2", "generation.max_new_tokens=8",
                   f"model.path={model}")
    trained = {"policy": local_policy(build_engine("hf", path=model)), "reward": local_reward(SentimentReward())}
    result = run_job(best, tmp_path / "bon", roles=trained)
    assert result["num_errors"] == 0 and result["generated_tokens"] > 0
