"""workflow=controlled_decoding and workflow=train_value on the in-process role groups (tiny model, no Ray).

Limiting cases: blockwise K=1 is plain sampling token for token; blockwise with M >= the budget and
the reward as scorer is Best-of-K bit for bit; tokenwise alpha=0 is the policy's top-k sampling.
Then the pieces: each block is the best-valued, KL accounting, calls per role, the value role in
value actors (here in process) and heads riding on the policy, and value training end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
from reward_fns import word_count

from qsteer.actors.local import LocalReplicas, local_policy, local_reward, local_value
from qsteer.actors.policy import Policy
from qsteer.actors.roles import PolicyGroup, TrainerGroup, ValueSum
from qsteer.actors.value import ValueTrainer
from qsteer.config import ConfigError, check_config, speculative_config
from qsteer.data import load_dataset
from qsteer.engines import SamplingParams
from qsteer.run import context, run_job
from qsteer.values import ValueScorer
from qsteer.values.guided import best_of_k_kl_bound
from qsteer.values.model import ValueModel
from qsteer.workflows import WORKFLOWS

GEN = ["generation.max_new_tokens=12"]


@pytest.fixture(scope="module")
def prompts():
    return load_dataset("sentiment", limit=3)


@pytest.fixture(scope="module")
def head_folder(tiny_engine64, tmp_path_factory):
    """A Q-head on the tiny policy's backbone with random weights, saved as train_value saves one."""
    model = ValueModel.on_policy_model(tiny_engine64.model, "q")
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("head") / "value"
    model.save(folder, policy_path=tiny_engine64.path)
    return str(folder)


def policy_with(engine, heads=(), value=None) -> PolicyGroup:
    policy = Policy(engine)
    if heads:
        policy.load_value_heads(list(heads))
    if value is not None:
        policy.attach_value(value)
    return PolicyGroup(LocalReplicas([policy]))


@pytest.fixture
def run(compose, tiny_engine64):
    def _run(records, *overrides, policy=None, value=None, reward=word_count):
        cfg = compose(*overrides)
        check_config(cfg)
        roles = {"policy": policy or policy_with(tiny_engine64), "reward": local_reward(reward)}
        if value is not None:
            roles["value"] = value
        ctx = context(cfg, roles, speculative_config(cfg))
        return WORKFLOWS[cfg.workflow.name].run(records, ctx), roles

    return _run


def test_blockwise_with_one_block_per_step_is_plain_sampling(run, prompts, head_folder, tiny_engine64):
    policy = policy_with(tiny_engine64, heads=[(head_folder, 1.0)])
    cd, _ = run(prompts, "workflow=controlled_decoding", "workflow.mode=blockwise", "workflow.n=1",
                "workflow.block_size=4", *GEN, policy=policy, value=ValueSum(policy, None))
    plain, _ = run(prompts, "workflow=sample", *GEN)
    assert [(r["output"], r["reward"]) for r in cd] == [(r["output"], r["reward"]) for r in plain]
    assert all(r["kl"] == 0.0 and r["kl_is_bound"] for r in cd)
    assert max(len(r["blocks"]) for r in cd) == 3  # 12 tokens in blocks of 4: the stream was continued


def test_blockwise_with_one_block_and_the_reward_as_scorer_is_best_of_k(run, prompts):
    cd, roles = run(prompts, "workflow=controlled_decoding", "workflow.mode=blockwise", "workflow.n=4",
                    "workflow.block_size=12", "workflow.score_finished=true", *GEN)
    bon, _ = run(prompts, "workflow=best_of_n", "workflow.n=4", *GEN)
    assert [(r["output"], r["reward"]) for r in cd] == [(r["output"], r["reward"]) for r in bon]
    for r, b in zip(cd, bon, strict=True):
        assert r["blocks"][0]["chosen"] == b["selected"]
        assert r["blocks"][0]["values"] == [c["reward"] for c in b["candidates"]]
        assert r["kl"] == pytest.approx(best_of_k_kl_bound(4)) and r["kl_is_bound"]
    assert any(b["selected"] > 0 for b in bon)


def test_blockwise_keeps_the_best_valued_block(run, prompts, head_folder, tiny_engine64):
    policy = policy_with(tiny_engine64, heads=[(head_folder, 1.0)])
    rows, roles = run(prompts, "workflow=controlled_decoding", "workflow.mode=blockwise", "workflow.n=3",
                      "workflow.block_size=4", *GEN, policy=policy, value=ValueSum(policy, None))
    for row in rows:
        for block in row["blocks"]:
            assert len(block["values"]) == 3
            assert block["chosen"] == max(range(3), key=lambda j: (block["values"][j], -j))
        assert row["kl"] == pytest.approx(len(row["blocks"]) * best_of_k_kl_bound(3)) and row["kl_is_bound"]
        assert row["stats"]["sampled_tokens"] == sum(sum(b["tokens"]) for b in row["blocks"])
        assert row["stats"]["generated_tokens"] == row["candidates"][0]["num_tokens"] <= 12
    assert any(b["chosen"] > 0 for row in rows for b in row["blocks"])
    # the first round's values are the head's values of [prompt, block] for the K sampled blocks
    prompt_ids = tiny_engine64.encode([p["prompt"] for p in prompts])
    comps = tiny_engine64.generate([prompt_ids[0]], SamplingParams(n=3, max_new_tokens=4, seed=0),
                                   [str(prompts[0]["id"])])[0]
    scorer = ValueScorer(policy.replicas.objects[0].heads[0][0], pad_id=tiny_engine64.pad_id)
    expected = scorer.values([prompt_ids[0] + c.token_ids for c in comps])
    assert rows[0]["blocks"][0]["values"] == pytest.approx(expected, abs=1e-9)


def test_tokenwise_alpha_zero_is_top_k_sampling_and_alpha_moves_it(run, prompts, head_folder, tiny_engine64):
    policy = policy_with(tiny_engine64, heads=[(head_folder, 1.0)])
    base = ["workflow=controlled_decoding", "workflow.top_k=8", *GEN]
    zero, _ = run(prompts, *base, "workflow.alpha=0", policy=policy)
    topk, _ = run(prompts, "workflow=sample", "generation.top_k=8", *GEN)
    assert [(r["output"], r["reward"]) for r in zero] == [(r["output"], r["reward"]) for r in topk]
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-12) and not r["kl_is_bound"] for r in zero)
    strong, roles = run(prompts, *base, "workflow.alpha=3", policy=policy)
    assert [r["output"] for r in strong] != [r["output"] for r in zero]
    for row in strong:
        assert row["kl"] > 0 and row["kl_full"] >= row["kl"]
        assert row["stats"]["value_scored_candidates"] == 8 * row["stats"]["generated_tokens"]
        assert row["stats"]["policy_forwards"] > 0 and row["stats"]["value_calls"] > 0
    assert [info["calls"] for info in roles["policy"].info()] == [2]  # encode, generate_guided: one call


def test_tokenwise_with_a_value_in_value_actors(run, prompts, head_folder, tiny_engine64):
    """A value in the value role (here in process) is called once per step for all rows; the same head
    riding in the policy gives the same law (its values agree to float rounding)."""
    model = ValueModel.on_policy_model(tiny_engine64.model, "q")
    model.head.load_state_dict(policy_with(tiny_engine64, heads=[(head_folder, 1.0)]).replicas.objects[0]
                               .heads[0][0].head.state_dict())
    group = local_value(ValueScorer(model, pad_id=tiny_engine64.pad_id))
    remote = policy_with(tiny_engine64, value=group)
    rows, _ = run(prompts, "workflow=controlled_decoding", "workflow.top_k=8", "workflow.alpha=2", *GEN,
                  policy=remote)
    steps = max(r["stats"]["generated_tokens"] for r in rows)
    assert [info["calls"] for info in group.info()] == [steps]
    riding, _ = run(prompts, "workflow=controlled_decoding", "workflow.top_k=8", "workflow.alpha=2", *GEN,
                    policy=policy_with(tiny_engine64, heads=[(head_folder, 1.0)]))
    assert [r["kl"] for r in rows] == pytest.approx([r["kl"] for r in riding], rel=1e-6)
    assert [r["output"] for r in rows] == [r["output"] for r in riding]


def test_multi_objective_weights_add(run, prompts, head_folder, tiny_engine64):
    double = policy_with(tiny_engine64, heads=[(head_folder, 2.0)])
    twice = policy_with(tiny_engine64, heads=[(head_folder, 1.0), (head_folder, 1.0)])
    a, _ = run(prompts, "workflow=controlled_decoding", "workflow.alpha=1", *GEN, policy=double)
    b, _ = run(prompts, "workflow=controlled_decoding", "workflow.alpha=1", *GEN, policy=twice)
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert [r["kl"] for r in a] == pytest.approx([r["kl"] for r in b], rel=1e-9)


def test_value_checks_name_the_key_before_any_model(compose, tmp_path, head_folder):
    with pytest.raises(ConfigError, match=r"^workflow\.mode=tokenwise runs on model\.engine=hf only"):
        check_config(compose("workflow=controlled_decoding", "model.engine=vllm"))
    with pytest.raises(ConfigError, match=r"^value\.path is required by workflow=controlled_decoding"):
        run_job(compose("workflow=controlled_decoding"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^value\.path='nowhere': "):
        run_job(compose("workflow=controlled_decoding", "value.path=nowhere"), tmp_path / "b")
    with pytest.raises(ConfigError, match=r"holds a q head on a policy backbone, but value.shape=scalar"):
        run_job(compose("workflow=controlled_decoding", f"value.path={head_folder}", "value.shape=scalar"),
                tmp_path / "c")
    with pytest.raises(ConfigError, match=r"^value\.method=cdq needs value\.shape=q"):
        check_config(compose("workflow=train_value", "value.method=cdq", "value.shape=scalar"))


def test_train_value_writes_a_checkpoint_that_steers(compose, tiny_engine64, tiny_path, tmp_path):
    """train_value end to end on the tiny model: samples, rewards, the fit, the folder and its card; then
    value.path loads it into controlled decoding."""
    cfg = compose("workflow=train_value", "dataset.limit=4", "generation.max_new_tokens=8",
                  "value.samples_per_prompt=4", "value.epochs=3", "value.lr=1e-2", "value.heldout_fraction=0.5",
                  "model.dtype=float64")
    trainer = TrainerGroup(LocalReplicas([ValueTrainer(tiny_path, epochs=3, lr=1e-2, dtype="float64",
                                                       device="cpu")]))
    roles = {"policy": local_policy(tiny_engine64), "reward": local_reward(word_count), "trainer": trainer}
    summary = run_job(cfg, tmp_path / "train", roles=roles)
    folder = tmp_path / "train" / "value"
    card = json.loads((folder / "value_card.json").read_text())
    assert {"value_head.safetensors", "value_head.json", "loss_curve.png", "README.md"} <= {
        p.name for p in folder.iterdir()}
    records = [json.loads(line) for line in (tmp_path / "train" / "results.jsonl").read_text().splitlines()]
    held = sum(len(r["candidates"]) for r in records if r["heldout"])
    assert card["train_sequences"] == 16 - held and card["heldout"].get("num_sequences", 0) == held
    assert card["steps"] == 3 * -(-card["train_sequences"] // 32) and card["last_loss"] < card["first_loss"]
    assert summary["metrics"]["value"]["train_sequences"] == card["train_sequences"]
    # value.path loads it: the checks pass and the head rides in the policy
    cd = compose("workflow=controlled_decoding", f"value.path={folder}", "dataset.limit=2", *GEN)
    steer = {"policy": policy_with(tiny_engine64, heads=[(str(folder), 1.0)]), "reward": local_reward(word_count)}
    out = run_job(cd, tmp_path / "cd", roles=steer)
    assert out["num_prompts"] == 2 and out["num_errors"] == 0
