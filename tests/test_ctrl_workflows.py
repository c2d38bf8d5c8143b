"""reward=calibrated in the workflows and workflow=win_rate, on the tiny model in this process (no Ray).

Defining properties, end to end through the role groups: the policy's own fresh samples get
uniform calibrated rewards (Kolmogorov-Smirnov), unchanged under increasing maps of the reward
(3r+1, exp r), one half under ties; the reference against itself wins 0.5 within the interval
for N in {1, 4}; Best-of-N of the reference against one reference sample wins about N/(N+1);
the KL of the reference to itself is exactly 0 by both estimators.
"""

from __future__ import annotations

import numpy as np
import pytest
from reward_fns import constant, text_hash, text_hash_affine, text_hash_exp
from scipy import stats

from qsteer.actors.local import local_policy, local_reward
from qsteer.config import ConfigError, check_config
from qsteer.data import load_dataset
from qsteer.results import summarize
from qsteer.run import context
from qsteer.workflows import WORKFLOWS

GEN = ["generation.max_new_tokens=4"]


@pytest.fixture(scope="module")
def prompts():
    return load_dataset("sentiment", limit=10)


@pytest.fixture
def run(compose, tiny_engine, tmp_path):
    def _run(records, *overrides, reward=text_hash):
        # the cache keys a reward by its config; these in-process rewards share one, so each gets its own folder
        cache = [f"reward.cache={tmp_path / 'refcache' / reward.__name__}"] if "reward=calibrated" in overrides else []
        cfg = compose(*overrides, *cache)
        check_config(cfg)
        roles = {"policy": local_policy(tiny_engine), "reward": local_reward(reward)}
        ctx = context(cfg, roles, None)
        return WORKFLOWS[cfg.workflow.name].run(records, ctx), ctx

    return _run


def calibrated_of(rows):
    return [c["info"]["calibrated"] for row in rows for c in row["candidates"]]


def test_fresh_policy_samples_are_uniform_and_invariant_to_increasing_maps(run, prompts):
    cal = ["reward=calibrated", "reward.num_reference=16", "workflow=sample", "workflow.n=6", *GEN]
    rows, ctx = run(prompts[:6], *cal)
    u = np.array(calibrated_of(rows))
    assert len(u) == 36 and ctx.reward.reference_calls == 1  # one batched reference call for all prompts
    # the policy is the reference: its fresh samples' C are uniform on [0, 1] (resolution 1/16)
    assert stats.kstest(u, "uniform").pvalue > 0.01
    assert abs(u.mean() - 0.5) < 3 * np.sqrt(1 / 12 / len(u))  # three standard errors of a uniform mean
    assert [r["reward"] for r in rows] == [r["candidates"][0]["info"]["calibrated"] for r in rows]  # identity
    for increasing in (text_hash_affine, text_hash_exp):
        again, _ = run(prompts[:6], *cal, reward=increasing)
        assert calibrated_of(again) == calibrated_of(rows)
        assert [c["info"]["raw_reward"] for r in again for c in r["candidates"]] != \
               [c["info"]["raw_reward"] for r in rows for c in r["candidates"]]


def test_ties_give_one_half_and_transforms_apply(run, prompts):
    rows, _ = run(prompts[:2], "reward=calibrated", "reward.num_reference=4", "workflow=best_of_n", "workflow.n=3",
                  *GEN, reward=constant)
    assert set(calibrated_of(rows)) == {0.5}
    rows, _ = run(prompts[:2], "reward=calibrated", "reward.num_reference=16", "reward.transform=bon",
                  "workflow=best_of_n", "workflow.n=3", *GEN)
    for row in rows:
        for c in row["candidates"]:  # default t for Best-of-4 at KL 1 is 20; exp(t (C - 1))
            assert c["reward"] == pytest.approx(np.exp(20.0 * (c["info"]["calibrated"] - 1.0)))
        assert row["reward"] == max(c["reward"] for c in row["candidates"])


def test_reference_cache_is_reused(run, prompts, tmp_path):
    first, ctx = run(prompts[:3], "reward=calibrated", "reward.num_reference=8", "workflow=sample", *GEN)
    again, ctx2 = run(prompts[:3], "reward=calibrated", "reward.num_reference=8", "workflow=sample", *GEN)
    assert ctx.reward.reference_calls == 1 and ctx2.reward.reference_calls == 0
    assert calibrated_of(first) == calibrated_of(again)


@pytest.mark.parametrize("n", [1, 4])
def test_reference_against_itself_is_one_half_within_its_interval(run, prompts, n):
    rows, _ = run(prompts, "workflow=win_rate", f"workflow.n={n}", "workflow.samples=8",
                  f"workflow.procedure={'sample' if n == 1 else 'bon'}", *GEN)
    metrics = summarize("win_rate", rows, wall_s=1.0, new_tokens=0)["metrics"]
    assert metrics["win_rate_ci_low"] <= 0.5 <= metrics["win_rate_ci_high"]
    assert metrics["win_rate_ci_high"] - metrics["win_rate_ci_low"] < 0.5
    assert all(len(r["candidates"]) == len(r["reference_rewards"]) == 8 for r in rows)
    # independent streams: the two sides' samples differ
    assert any([c["reward"] for c in r["candidates"]] != r["reference_rewards"] for r in rows)
    # the candidate is the reference: its log-probabilities are the reference's, so both KLs are 0
    assert abs(metrics["kl_k1"]) < 1e-4 and abs(metrics["kl_k3"]) < 1e-4


def test_best_of_n_of_the_reference_against_one_reference_sample(run, prompts):
    n = 4
    rows, _ = run(prompts, "workflow=win_rate", "workflow.procedure=bon", f"workflow.n={n}", "workflow.samples=8",
                  "workflow.opponent=sample", *GEN)
    metrics = summarize("win_rate", rows, wall_s=1.0, new_tokens=0)["metrics"]
    assert metrics["win_rate_ci_low"] <= n / (n + 1) <= metrics["win_rate_ci_high"]
    assert abs(metrics["win_rate"] - n / (n + 1)) < 0.08


def test_win_rate_config_errors(compose):
    with pytest.raises(ConfigError, match="workflow.samples"):
        check_config(compose("workflow=win_rate", "workflow.n=4", "workflow.samples=2"))
    with pytest.raises(ConfigError, match="reward.target"):
        check_config(compose("reward=calibrated", "reward.base=callable"))
    with pytest.raises(ConfigError, match="workflow.eval_n"):
        check_config(compose("workflow=ctrl_align", "workflow.eval_samples=4"))


@pytest.mark.ray
def test_win_rate_with_a_candidate_group_and_calibrated_reward_on_ray(ray_session, compose, tiny_path, tmp_path):
    from qsteer.run import run_job

    cfg = compose("workflow=win_rate", f"workflow.candidate={tiny_path}", f"model.path={tiny_path}",
                  "workflow.procedure=bon", "workflow.n=2", "workflow.samples=4", "reward=calibrated",
                  "reward.num_reference=8", f"reward.cache={tmp_path / 'cache'}", "dataset.limit=4",
                  "generation.max_new_tokens=4", "model.num_cpus=0", "cluster.dashboard=false")
    summary = run_job(cfg, tmp_path / "run")
    metrics = summary["metrics"]
    assert summary["num_errors"] == 0 and metrics["win_rate_prompts"] == 4
    assert metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
    # the candidate is the same weights in its own actor: the same log-probabilities, so KL 0
    assert abs(metrics["kl_k1"]) < 1e-3 and 0 <= metrics["kl_k3"] < 1e-3
    assert 0 <= metrics["mean_calibrated"] <= 1 and 0 <= metrics["reference_mean_calibrated"] <= 1
