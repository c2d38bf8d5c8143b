"""On the default model and the sentiment reward: a value trained by workflow=train_value predicts
held-out rewards (correlation > 0.3), and tokenwise controlled decoding with it raises the mean reward
over alpha = 0 (the policy's own top-k sampling), with fixed seeds. In process (no Ray); the same
workflow functions the Ray roles run."""

from __future__ import annotations

import json

import pytest

from qsteer.actors.local import LocalReplicas, local_reward
from qsteer.actors.policy import Policy
from qsteer.actors.roles import PolicyGroup, TrainerGroup
from qsteer.actors.value import ValueTrainer
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import run_job

pytestmark = [pytest.mark.model, pytest.mark.heavy]

PROMPTS = 40
SAMPLES = 6
TOKENS = 16
SHAPE, LR, EPOCHS = "q", 1e-4, 16  # held-out correlation 0.333 on these samples (docs/values.md)
ALPHA = 4.0


def test_a_trained_value_predicts_held_out_rewards_and_steers(engine, compose, tmp_path):
    train = compose("workflow=train_value", f"dataset.limit={PROMPTS}", f"generation.max_new_tokens={TOKENS}",
                    f"value.samples_per_prompt={SAMPLES}", f"value.shape={SHAPE}", f"value.lr={LR}",
                    f"value.epochs={EPOCHS}")
    policy = Policy(engine)
    trainer = TrainerGroup(LocalReplicas([ValueTrainer(engine.path, shape=SHAPE, lr=LR, epochs=EPOCHS)]))
    roles = {"policy": PolicyGroup(LocalReplicas([policy])), "reward": local_reward(SentimentReward()),
             "trainer": trainer}
    summary = run_job(train, tmp_path / "train", roles=roles)
    card = summary["metrics"]["value"]
    print(json.dumps(card["heldout"]))
    assert card["heldout"]["final_correlation"] > 0.3
    assert card["heldout"]["final_mse"] < card["heldout"]["constant_mse"]

    # steer the held-out prompts with it: the head rides in the policy
    records = [json.loads(line) for line in (tmp_path / "train" / "results.jsonl").read_text().splitlines()]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n"
                            for r in records if r["heldout"]))
    policy.load_value_heads([(str(tmp_path / "train" / "value"), 1.0)])
    means = {}
    for alpha in (0.0, ALPHA):
        cfg = compose("workflow=controlled_decoding", f"workflow.alpha={alpha}", "dataset=jsonl",
                      f"dataset.path={held}", f"generation.max_new_tokens={TOKENS}",
                      f"value.path={tmp_path / 'train' / 'value'}", f"value.shape={SHAPE}")
        out = run_job(cfg, tmp_path / f"cd{alpha}", roles={"policy": roles["policy"], "reward": roles["reward"]})
        means[alpha] = out["mean_reward"]
    print(means)
    assert means[ALPHA] > means[0.0]
