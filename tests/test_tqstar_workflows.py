"""Transfer Q* and ARGS as workflows on the in-process role groups, on the tiny model (float64, so
outputs are bitwise independent of batch shapes): limiting cases, batching of rollouts, accounting."""

from __future__ import annotations

import pytest
from reward_fns import word_count

from qsteer.actors.local import local_policy, local_reward
from qsteer.config import speculative_config
from qsteer.data import load_dataset
from qsteer.run import context
from qsteer.workflows import WORKFLOWS

STEPS = 4
GEN = [f"generation.max_new_tokens={STEPS}"]
TQ = ["workflow=transfer_qstar", "workflow.top_k=3", "workflow.rollout_tokens=3", *GEN]


@pytest.fixture(scope="module")
def engines(tiny_path):
    from qsteer.engines import build_engine

    return [build_engine("hf", path=tiny_path, dtype="float64", max_batch_rows=64) for _ in range(2)]


@pytest.fixture(scope="module")
def prompts():
    return load_dataset("sentiment", limit=2)


class Recorder:
    """word_count, remembering every text it scored (TRL signature)."""

    def __init__(self) -> None:
        self.texts: list[list[str]] = []

    def __call__(self, prompts, completions, **kwargs):
        self.texts.append(list(completions))
        return word_count(prompts, completions)


@pytest.fixture
def run(compose, engines):
    def _run(records, *overrides, reward=word_count, baseline_reward=None):
        cfg = compose(*overrides)
        roles = {"policy": local_policy(engines[0]), "baseline": local_policy(engines[1]),
                 "reward": local_reward(reward), "baseline_reward": local_reward(baseline_reward or reward)}
        ctx = context(cfg, roles, speculative_config(cfg))
        return WORKFLOWS[cfg.workflow.name].run(records, ctx), roles

    return _run


def outputs(rows):
    return [(r["output"], r["reward"]) for r in rows]


@pytest.mark.parametrize("workflow", [TQ, ["workflow=args", "workflow.top_k=3", *GEN]])
def test_alpha_zero_is_greedy_decoding_or_top_k_sampling(run, prompts, workflow):
    greedy, _ = run(prompts, *workflow, "workflow.alpha=0")
    plain, _ = run(prompts, "workflow=sample", "generation.temperature=0", *GEN)
    assert outputs(greedy) == outputs(plain)
    sampled, _ = run(prompts, *workflow, "workflow.alpha=0", "workflow.greedy=false", "seed=3")
    top_k, _ = run(prompts, "workflow=sample", "generation.top_k=3", "seed=3", *GEN)
    assert outputs(sampled) == outputs(top_k)
    assert outputs(sampled) != outputs(greedy)


def test_tqstar_rolls_out_every_step_in_one_baseline_call_and_accounts_for_it(run, prompts):
    rows, roles = run(prompts, *TQ, "workflow.alpha=2", "workflow.rollouts=2", "workflow.rollout_sampling=sample")
    k, m, length = 3, 2, 3
    steps = max(r["candidates"][0]["num_tokens"] for r in rows)
    # one rollout call and one reward call per step for all prompts' k x m rollouts, + the final scoring
    assert [info["calls"] for info in roles["baseline"].info()] == [steps]
    assert [info["calls"] for info in roles["reward"].info()] == [steps + 1]
    assert [info["calls"] for info in roles["baseline_reward"].info()] == [0]  # direct transfer
    for row in rows:
        tokens = row["candidates"][0]["num_tokens"]
        stats = row["stats"]
        assert stats["rollouts"] == tokens * k * m == stats["rewarded_texts"]
        assert 0 < stats["baseline_tokens"] <= tokens * k * m * length  # fewer only where a rollout hit EOS
        assert stats["reference_forwards"] > 0 and row["kl"] >= 0 and row["transfer"] == "direct"
    # rows share each step's calls: the per-row shares add up to the calls made
    assert sum(r["stats"]["baseline_calls"] for r in rows) == pytest.approx(steps)


def test_rollout_tokens_are_steps_x_k_x_m_x_l_without_eos(run, prompts):
    """The tiny model's EOS is never drawn greedily here, so every rollout has exactly L tokens."""
    rows, _ = run(prompts[:1], *TQ, "workflow.alpha=1")
    row = rows[0]
    assert row["candidates"][0]["finish_reason"] == "length"
    assert row["stats"]["baseline_tokens"] == STEPS * 3 * 1 * 3


def test_indirect_with_the_same_reward_is_direct_transfer(run, prompts):
    overrides = [*TQ, "workflow.alpha=1", "workflow.rollouts=2", "workflow.rollout_sampling=sample",
                 "workflow.greedy=false"]
    direct, _ = run(prompts[:1], *overrides)
    for estimator in ("normalized", "reference"):
        indirect, roles = run(prompts[:1], *overrides, "workflow.transfer=indirect", f"workflow.estimator={estimator}")
        assert outputs(indirect) == outputs(direct)
        assert [r["kl"] for r in indirect] == [r["kl"] for r in direct]
        assert roles["baseline_reward"].info()[0]["calls"] == roles["reward"].info()[0]["calls"] - 1


def test_alpha_steers_toward_the_reward(run, prompts):
    plain, _ = run(prompts, *TQ, "workflow.alpha=0")
    steered, _ = run(prompts, *TQ, "workflow.alpha=5")
    assert outputs(steered) != outputs(plain)
    mean = lambda rows: sum(r["reward"] for r in rows) / len(rows)  # noqa: E731
    assert mean(steered) > mean(plain)


def test_logit_model_baseline_rolls_out_in_the_baseline_actor(run, prompts):
    rows, roles = run(prompts, *TQ, "workflow.alpha=0", "workflow.logit_model=baseline")
    plain, _ = run(prompts, "workflow=sample", "generation.temperature=0", *GEN)
    assert outputs(rows) == outputs(plain)  # the two engines hold the same weights
    assert roles["policy"].info()[0]["calls"] == 0  # the reference is not asked
    steps = max(r["candidates"][0]["num_tokens"] for r in rows)
    assert roles["baseline"].info()[0]["calls"] == 1 + steps  # the guided call, and its rollouts inside it


def test_args_scores_exactly_prefix_plus_candidate(run, prompts, engines):
    recorder = Recorder()
    rows, roles = run(prompts[:1], "workflow=args", "workflow.top_k=3", "workflow.alpha=1", *GEN, reward=recorder)
    steps = rows[0]["candidates"][0]["num_tokens"]
    assert len(recorder.texts) == steps + 1 and all(len(t) == 3 for t in recorder.texts[:-1])
    engine = engines[0]
    prompt_ids = engine.encode([prompts[0]["prompt"]])
    top = engine.topk_next(prompt_ids, 3)[0]
    assert sorted(recorder.texts[0]) == sorted(engine.decode([z]) for z, _ in top)
    assert rows[0]["stats"]["rewarded_texts"] == 3 * steps
    one, _ = run(prompts, "workflow=args", "workflow.top_k=1", "workflow.alpha=50", *GEN)
    greedy, _ = run(prompts, "workflow=sample", "generation.temperature=0", *GEN)
    assert outputs(one) == outputs(greedy)  # k = 1 is greedy for any weight


def test_bad_settings_are_refused_by_key(compose, tmp_path):
    from qsteer.config import ConfigError, check_config
    from qsteer.run import run_job

    with pytest.raises(ConfigError, match="baseline.path="):  # before Ray or any model starts
        run_job(compose("workflow=transfer_qstar", f"baseline.path={tmp_path / 'nowhere'}"), tmp_path / "run")
    with pytest.raises(ConfigError, match="baseline.engine=vllm"):
        run_job(compose("workflow=transfer_qstar", "workflow.logit_model=baseline", "baseline.engine=vllm"),
                tmp_path / "run")

    with pytest.raises(ConfigError, match="workflow.rollouts"):
        check_config(compose("workflow=transfer_qstar", "workflow.rollouts=4"))
    with pytest.raises(ConfigError, match="workflow.n"):
        check_config(compose("workflow=args", "workflow.n=2"))
    with pytest.raises(ConfigError, match="baseline.reward.target"):
        check_config(compose("workflow=transfer_qstar", "baseline.reward.name=callable"))
