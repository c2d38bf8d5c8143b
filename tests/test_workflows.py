"""Every workflow as a plain function on the in-process role groups: the tiny model, real rewards, no Ray.

Each test checks the workflow's defining property: Best-of-N outputs its best candidate, N=1 is
plain sampling and N's candidates extend fewer N's; score rewards the given completions; greedy
speculative decoding gives the plain greedy output.
"""

from __future__ import annotations

import pytest
from reward_fns import word_count

from qsteer.actors.local import local_policy, local_reward
from qsteer.config import speculative_config
from qsteer.data import load_dataset
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import context
from qsteer.workflows import WORKFLOWS

GEN = ["generation.max_new_tokens=12"]


@pytest.fixture(scope="module")
def prompts():
    return load_dataset("sentiment", limit=3)


@pytest.fixture
def run(compose, tiny_engine):
    """Run `workflow.name` of the composed config on `records` with in-process groups."""

    def _run(records, *overrides, reward=word_count):
        cfg = compose(*overrides)
        roles = {"policy": local_policy(tiny_engine), "reward": local_reward(reward)}
        ctx = context(cfg, roles, speculative_config(cfg))
        return WORKFLOWS[cfg.workflow.name].run(records, ctx), roles

    return _run


def test_best_of_n_outputs_its_best_candidate_and_candidates_nest(run, prompts):
    small, _ = run(prompts, "workflow=best_of_n", "workflow.n=3", *GEN)
    big, roles = run(prompts, "workflow=best_of_n", "workflow.n=6", *GEN)
    assert [info["calls"] for info in roles["policy"].info()] == [1]  # one generate call for the batch
    assert [info["calls"] for info in roles["reward"].info()] == [1]  # one reward call for all 18 texts
    for few, many in zip(small, big, strict=True):
        rewards = [c["reward"] for c in many["candidates"]]
        assert len(rewards) == 6 and many["error"] is None
        assert many["reward"] == max(rewards) == rewards[many["selected"]]
        assert many["output"] == many["candidates"][many["selected"]]["text"]
        # the same per-sample random streams: N=6's first three are N=3's
        assert [c["text"] for c in many["candidates"][:3]] == [c["text"] for c in few["candidates"]]
        assert word_count([], [many["output"]]) == [many["reward"]]
    assert any(row["selected"] > 0 for row in big)  # the choice is made, not the first sample kept


def test_best_of_one_is_plain_sampling(run, prompts):
    best, _ = run(prompts, "workflow=best_of_n", "workflow.n=1", *GEN)
    sampled, _ = run(prompts, "workflow=sample", *GEN)
    assert [(r["output"], r["reward"]) for r in best] == [(r["output"], r["reward"]) for r in sampled]


def test_sample_keeps_the_first_of_n_and_counts_its_tokens(run, prompts):
    rows, _ = run(prompts, "workflow=sample", "workflow.n=3", *GEN)
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]
    for row in rows:
        assert len(row["candidates"]) == 3 and row["output"] == row["candidates"][0]["text"]
        assert row["reward"] == row["candidates"][0]["reward"] == word_count([], [row["output"]])[0]
        assert row["stats"]["generated_tokens"] == sum(c["num_tokens"] for c in row["candidates"]) > 0
        assert all(1 <= c["num_tokens"] <= 12 for c in row["candidates"])
        assert row["stats"]["prompt_tokens"] > 0


def test_score_rewards_the_given_completions_without_a_policy(compose):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    records = [
        {"id": "a", "prompt": "Review the cafe.", "completion": "It was a lovely, wonderful place."},
        {"id": "b", "prompt": "Review the cafe.", "completion": "Dirty and awful."},
        {"id": "c", "prompt": "Review the cafe."},
    ]
    cfg = compose("workflow=score")
    reward = local_reward(SentimentReward())
    rows = WORKFLOWS["score"].run(records, context(cfg, {"reward": reward}, None))
    vader = SentimentIntensityAnalyzer()
    for record, row in zip(records[:2], rows[:2], strict=True):
        assert row["output"] == record["completion"] and row["error"] is None
        assert row["reward"] == vader.polarity_scores(record["completion"])["compound"]
        assert row["candidates"] == [{"text": record["completion"], "reward": row["reward"]}]
    assert rows[0]["reward"] > 0 > rows[1]["reward"]
    assert rows[2]["output"] is None and "completion" in rows[2]["error"]


def test_speculative_greedy_output_is_the_plain_greedy_output(run, prompts):
    greedy = ["generation.temperature=0", "generation.max_new_tokens=16"]
    spec, _ = run(prompts, "workflow=speculative", "draft=lookup", *greedy)
    plain, _ = run(prompts, "workflow=sample", *greedy)
    assert [r["output"] for r in spec] == [r["output"] for r in plain]
    for row in spec:
        assert row["identical_to_plain"] is True
        assert row["stats"]["spec"]["rounds"] > 0
        assert row["stats"]["plain_generated_tokens"] == row["stats"]["generated_tokens"]


def test_a_record_whose_reward_fails_carries_the_error_and_the_rest_do_not(run, prompts):
    from reward_fns import fails_on_marked_prompts

    records = [prompts[0], {**prompts[1], "id": "x-bad"}]
    rows, _ = run(records, "workflow=best_of_n", "workflow.n=2", *GEN, reward=fails_on_marked_prompts)
    assert rows[0]["error"] is None and rows[0]["reward"] == 1.0
    assert "reward service refused" in rows[1]["error"] and rows[1]["reward"] is None
    assert len(rows[1]["candidates"]) == 2  # the generated texts are kept beside the error


def test_in_process_group_sends_calls_to_the_least_busy_replica():
    """Two calls at once must land on two replicas: each waits for the other inside the reward."""
    import threading

    meet = threading.Barrier(2, timeout=30)

    def rendezvous(prompts, completions, **_):
        meet.wait()
        return [1.0 for _ in completions]

    group = local_reward(rendezvous, rendezvous)
    outs: list = []
    threads = [threading.Thread(target=lambda: outs.append(group.score(["p"], ["c"], None, {}))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs == [[(1.0, {})], [(1.0, {})]]
    assert [info["calls"] for info in group.info()] == [1, 1]


def test_an_empty_prompt_errs_on_its_own_record(run, prompts):
    rows, _ = run([{"id": "empty", "prompt": ""}, prompts[0]], "workflow=sample", "model.chat_template=false", *GEN)
    assert rows[0]["error"] == "prompt is empty" and rows[0]["output"] is None
    assert rows[1]["error"] is None and rows[1]["output"]
