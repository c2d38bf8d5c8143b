"""The generation cache on the tiny model, without Ray: a new reward generates nothing, N 4 -> 8 generates
only the 4 new samples per prompt, and what the cache serves equals what generating gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsteer.actors.local import local_policy, local_reward
from qsteer.cache import CachedPolicy, GenerationCache, model_identity
from qsteer.engines import SamplingParams
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import run_job

FAST = ["dataset.limit=3", "generation.max_new_tokens=6", "batch_size=3", "model.dtype=float64"]


@pytest.fixture(scope="module")
def engine64(tiny_path):
    """float64: samples are bitwise independent of which rows share a batch (docs/architecture.md)."""
    from qsteer.engines import build_engine

    return build_engine("hf", path=tiny_path, dtype="float64", max_batch_rows=64)


def word_count(prompts, completions, **kw):
    return [float(len(c.split())) for c in completions]


def candidates(out: Path) -> list[list[str]]:
    return [[c["text"] for c in json.loads(line)["candidates"]] for line in (out / "results.jsonl").read_text().splitlines()]


def test_engine_first_sample_gives_the_later_samples_of_a_larger_n(engine64):
    ids = engine64.encode(["Tell me a story.", "Hi"])
    params = SamplingParams(n=5, max_new_tokens=6, seed=3)
    whole = engine64.generate(ids, params, ["a", "b"])
    tail = engine64.generate(ids, SamplingParams(n=3, max_new_tokens=6, seed=3, first_sample=2), ["a", "b"])
    assert [[c.token_ids for c in row[2:]] for row in whole] == [[c.token_ids for c in row] for row in tail]
    assert whole[0][0].token_ids != whole[0][1].token_ids  # the samples are not all the same


def test_a_new_reward_generates_nothing_and_a_larger_n_only_the_new_samples(compose, engine64, tiny_path, tmp_path):
    cache = str(tmp_path / "cache")
    policy = local_policy(engine64)
    calls = lambda: policy.info()[0]["calls"]  # noqa: E731  generate calls the policy served

    def run(out: str, reward, *overrides: str) -> dict:
        return run_job(compose(f"model.path={tiny_path}", f"generation_cache={cache}", *FAST, *overrides),
                       tmp_path / out, roles={"policy": policy, "reward": local_reward(reward)})

    first = run("sentiment4", SentimentReward(), "workflow.n=4")
    assert first["metrics"]["generation_cache"]["hits"] == 0
    assert first["metrics"]["generation_cache"]["misses"] == 12  # 3 prompts x 4 samples
    assert first["metrics"]["generation_cache"]["generated_tokens"] == first["generated_tokens"]
    before = calls()

    rescored = run("words4", word_count, "reward=callable", "reward.target=test_cache:word_count", "workflow.n=4")
    assert rescored["metrics"]["generation_cache"] == {"hits": 12, "misses": 0, "generated_tokens": 0}
    assert calls() == before  # not one generate call
    assert candidates(tmp_path / "words4") == candidates(tmp_path / "sentiment4")
    rewards = [[c["reward"] for c in json.loads(line)["candidates"]]
               for line in (tmp_path / "words4" / "results.jsonl").read_text().splitlines()]
    assert rewards == [[float(len(t.split())) for t in row] for row in candidates(tmp_path / "words4")]

    grown = run("sentiment8", SentimentReward(), "workflow.n=8")
    assert grown["metrics"]["generation_cache"]["hits"] == 12 and grown["metrics"]["generation_cache"]["misses"] == 12
    assert calls() == before + 1  # the 4 new samples of every prompt, in one call
    # what the cache assembled equals generating N=8 afresh
    fresh = run_job(compose(f"model.path={tiny_path}", *FAST, "workflow.n=8"), tmp_path / "fresh8",
                    roles={"policy": local_policy(engine64), "reward": local_reward(SentimentReward())})
    assert "generation_cache" not in fresh["metrics"]
    assert candidates(tmp_path / "sentiment8") == candidates(tmp_path / "fresh8")
    assert grown["mean_reward"] == fresh["mean_reward"]


def test_the_key_holds_everything_that_changes_a_sample(engine64, tiny_path, tmp_path):
    cache = CachedPolicy(local_policy(engine64), GenerationCache(tmp_path, model_identity(tiny_path, dtype="float64")))
    ids = engine64.encode(["Tell me a story."])
    base = SamplingParams(n=2, max_new_tokens=4, seed=1)
    cache.generate(ids, base, ["a"])
    for params, key in [(SamplingParams(n=2, max_new_tokens=4, seed=2), "a"),   # seed
                        (SamplingParams(n=2, max_new_tokens=4, seed=1), "b"),   # prompt id: its streams
                        (SamplingParams(n=2, max_new_tokens=5, seed=1), "a"),   # sampling parameters
                        (SamplingParams(n=2, max_new_tokens=4, seed=1, temperature=0.5), "a")]:
        misses = cache.misses
        cache.generate(ids, params, [key])
        assert cache.misses == misses + 2, (params, key)
    other = CachedPolicy(local_policy(engine64), GenerationCache(tmp_path, model_identity(tiny_path, dtype="float32")))
    other.generate(ids, base, ["a"])
    assert other.misses == 2  # another model identity (dtype) shares nothing
    again = CachedPolicy(local_policy(engine64), GenerationCache(tmp_path, model_identity(tiny_path, dtype="float64")))
    out = again.generate(ids, base, ["a"])
    assert again.counts() == {"hits": 2, "misses": 0, "generated_tokens": 0}
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in engine64.generate(ids, base, ["a"])[0]]
