"""PG-TD on the tiny random-weight model and the real sandbox: its defining properties.

- One rollout and no tree growth is greedy decoding: the root's greedy rollout is the output.
- With top_k = 1 the tree is a chain along the greedy path, and the rollout cache answers every
  later rollout: the model is called for one rollout only, and the output is still greedy.
- P-UCB: an unvisited level follows the prior, and values back up as the best reward below.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from qsteer.actors.local import local_policy, local_sandbox
from qsteer.data import load_dataset
from qsteer.run import context
from qsteer.workflows import WORKFLOWS
from qsteer.workflows.pgtd import Node, p_ucb

TOKENS = 8


@pytest.fixture(scope="module")
def records():
    return load_dataset("basic_code", limit=2)


@pytest.fixture
def run(compose, tiny_engine):
    def _run(*overrides):
        cfg = compose("workflow=pgtd", f"generation.max_new_tokens={TOKENS}", *overrides)
        roles = {"policy": local_policy(tiny_engine), "sandbox": local_sandbox(1, timeout_s=5.0)}
        ctx = context(cfg, roles, None)
        return WORKFLOWS["pgtd"].run(load_dataset("basic_code", limit=2), ctx), ctx

    return _run


def greedy_texts(ctx, records) -> list[str]:
    ids = ctx.policy.encode([r["prompt"] for r in records], ctx.chat)
    outs = ctx.policy.generate(ids, replace(ctx.params, temperature=0.0, n=1), [r["id"] for r in records])
    eos = set(ctx.policy.info()[0]["eos_token_ids"])
    return ctx.policy.decode([[t for t in o[0].token_ids if t not in eos] for o in outs])


def test_one_rollout_without_growth_is_greedy_decoding(run, records):
    rows, ctx = run("workflow.rollouts=1")
    assert [r["output"] for r in rows] == greedy_texts(ctx, records)
    assert all(r["pgtd"]["model_rollouts"] == 1 and len(r["candidates"]) == 1 for r in rows)


def test_a_top_1_chain_reuses_the_first_rollout(run, records):
    rows, ctx = run("workflow.rollouts=5", "workflow.top_k=1")
    assert [r["output"] for r in rows] == greedy_texts(ctx, records)
    for row in rows:
        assert row["pgtd"]["model_rollouts"] == 1 and row["pgtd"]["programs"] == 1
        assert row["pgtd"]["tree_nodes"] == 1 + 5  # each iteration expanded the chain by one node
        assert row["stats"]["generated_tokens"] <= TOKENS


def test_wider_search_evaluates_several_programs(run):
    rows, _ = run("workflow.rollouts=4", "workflow.top_k=3")
    for row in rows:
        assert 1 <= row["pgtd"]["model_rollouts"] <= 4 and row["pgtd"]["tree_nodes"] >= 4
        shares = [c["public_share"] for c in row["candidates"]]
        assert row["candidates"][row["selected"]]["public_share"] == max(shares)


def test_p_ucb_follows_the_prior_first_then_values():
    parent = Node(tokens=(), visits=0)
    likely, unlikely = Node(tokens=(1,), prior=0.7), Node(tokens=(2,), prior=0.3)
    assert max([unlikely, likely], key=lambda c: p_ucb(parent, c, 10.0, 4.0)) is likely
    parent.visits, likely.visits, unlikely.value = 5, 4, 1.0
    assert max([likely, unlikely], key=lambda c: p_ucb(parent, c, 10.0, 4.0)) is unlikely


@pytest.mark.slow  # two float64 engines and two searches: over a minute on a loaded 2-core machine
def test_rollouts_reuse_prefixes_through_the_engines_prefix_cache(compose, tiny_path):
    """With `model.prefix_cache_tokens`, a rollout from a deeper node prefills only its new tokens;
    in float64 the search is the same as without the cache."""
    from qsteer.engines.hf import HFEngine

    cfg = compose("workflow=pgtd", f"generation.max_new_tokens={TOKENS}", "workflow.rollouts=4", "workflow.top_k=2",
                  "generation.temperature=0")
    records = load_dataset("basic_code", limit=2)
    outputs, engines = [], []
    for tokens in (0, 8192):
        engine = HFEngine(path=tiny_path, dtype="float64", max_batch_rows=64, prefix_cache_tokens=tokens)
        ctx = context(cfg, {"policy": local_policy(engine), "sandbox": local_sandbox(1, timeout_s=5.0)}, None)
        outputs.append([(r["output"], [c["text"] for c in r["candidates"]]) for r in WORKFLOWS["pgtd"].run(records, ctx)])
        engines.append(engine)
    assert outputs[0] == outputs[1]
    stats = engines[1].prefix_cache_stats()
    assert stats["hits"] > 0 and stats["reused_tokens"] > 0  # later rollouts reuse the earlier prompts
