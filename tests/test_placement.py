"""Placement as data: the plan laid onto nodes, refusals naming the role, and the dry run (no Ray, no model)."""

from __future__ import annotations

import pytest

from qsteer.cluster.placement import Demand, Node, PlacementError, plan_placement
from qsteer.config.groups import PlacementGroupConfig
from qsteer.run import run_job

TWO_NODES = [Node("a" * 16, "10.0.0.1", {"CPU": 2.0, "GPU": 1.0}), Node("b" * 16, "10.0.0.2", {"CPU": 2.0, "GPU": 1.0})]


def group(*roles: str, strategy: str = "PACK") -> PlacementGroupConfig:
    return PlacementGroupConfig(roles=roles, strategy=strategy)


def test_strict_spread_puts_each_replica_on_its_own_node():
    plan = plan_placement([Demand("policy", 2, 1, 0), Demand("reward", 1, 0, 0)],
                          (group("policy", strategy="STRICT_SPREAD"),), TWO_NODES)
    nodes = {s.replica: s.node for s in plan.slots if s.role == "policy"}
    assert sorted(nodes.values()) == [0, 1]
    assert [s.bundle for s in plan.slots if s.role == "policy"] == [0, 1]
    assert [s.group for s in plan.slots if s.role == "reward"] == [None]


def test_colocated_roles_share_bundles_and_strict_pack_that_no_node_holds_is_refused():
    with pytest.raises(PlacementError, match=r"cluster\.placement\[0\] \(roles policy, draft\): STRICT_PACK"):
        plan_placement([Demand("policy", 2, 1, 0.5), Demand("draft", 2, 0.5, 0.5)],
                       (group("policy", "draft", strategy="STRICT_PACK"),), TWO_NODES)
    plan = plan_placement([Demand("policy", 2, 1, 0.5), Demand("draft", 2, 0.5, 0.5)],
                          (group("policy", "draft", strategy="PACK"),), TWO_NODES)
    assert plan.bundles[0] == [{"CPU": 1.5, "GPU": 1.0}] * 2
    # one bundle per node (1.5 CPU each does not fit twice on 2 CPUs); policy and draft replica i share it
    assert {(s.role, s.replica): s.node for s in plan.slots} == {
        ("policy", 0): 0, ("draft", 0): 0, ("policy", 1): 1, ("draft", 1): 1}


def test_an_impossible_plan_is_refused_naming_the_role():
    with pytest.raises(PlacementError, match=r"role policy \(model\.replicas=5 x model\.num_cpus=1.*replica 4 fits on no node"):
        plan_placement([Demand("policy", 5, 1, 0)], (), TWO_NODES)
    with pytest.raises(PlacementError, match=r"placement\[0\] \(roles reward\).*bundle 2.*STRICT_SPREAD"):
        plan_placement([Demand("policy", 1, 1, 0), Demand("reward", 3, 0, 0)],
                       (group("reward", strategy="STRICT_SPREAD"),), TWO_NODES)
    with pytest.raises(PlacementError, match=r"replicas must be equal"):
        plan_placement([Demand("policy", 2, 1, 0), Demand("reward", 1, 0, 0)], (group("policy", "reward"),), TWO_NODES)
    with pytest.raises(PlacementError, match=r"role reward .* reward\.num_gpus=1.*fits on no node"):
        plan_placement([Demand("reward", 1, 0, 1)], (), [Node("c" * 16, "x", {"CPU": 4.0})])


@pytest.mark.parametrize("role,key", [("candidate", "model"), ("baseline", "baseline"),
                                      ("baseline_reward", "baseline.reward"), ("baseline_trainer", "model")])
def test_every_role_run_can_start_is_named_by_its_config_key_when_refused(role, key):
    with pytest.raises(PlacementError, match=rf"role {role} \({key}\.replicas=1 x {key}\.num_cpus=8"):
        plan_placement([Demand(role, 1, 8, 0)], (), TWO_NODES)


def test_a_role_the_workflow_does_not_run_is_left_out_of_its_group():
    plan = plan_placement([Demand("reward", 2, 0, 0)], (group("policy", "reward", strategy="SPREAD"),), TWO_NODES)
    assert [(s.role, s.node) for s in plan.slots] == [("reward", 0), ("reward", 1)]
    assert plan.bundles[0] == [{"CPU": 0.01}] * 2  # Ray refuses empty bundles


def test_dry_run_prints_the_plan_and_starts_nothing(compose, tmp_path, capsys):
    out = tmp_path / "run"
    # a model folder that does not exist: a dry run never loads it
    summary = run_job(compose("cluster.dry_run=true", "cluster.num_cpus=2", "model.replicas=2",
                              "model.path=/nonexistent/model", "cluster.placement=[{roles: [policy], strategy: SPREAD}]"),
                      out)
    assert summary["dry_run"] and summary["fits"]
    assert [(r["role"], r["replica"], r["placement_group"], r["bundle"]) for r in summary["plan"]] == [
        ("policy", 0, 0, 0), ("policy", 1, 0, 1), ("reward", 0, None, None)]
    printed = capsys.readouterr().out
    assert "no actor started, no model loaded" in printed and "group 0 bundle 1" in printed
    assert not out.exists()
    with pytest.raises(PlacementError, match=r"role policy \(model\.replicas=3 x model\.num_cpus=1"):
        run_job(compose("cluster.dry_run=true", "cluster.num_cpus=2", "model.replicas=3"), out)


def test_placement_config_errors_name_the_key(compose):
    from qsteer.config import ConfigError, check_config

    with pytest.raises(ConfigError, match=r"cluster\.placement\[1\]\.roles names policy, already placed"):
        check_config(compose("cluster.placement=[{roles: [policy]}, {roles: [reward, policy]}]"))
    with pytest.raises(ConfigError, match=r"cluster\.placement\[0\]\.roles\[0\]=.value. is not one of"):
        check_config(compose("cluster.placement=[{roles: [value]}]"))
    with pytest.raises(ConfigError, match=r"cluster\.placement\[0\]\.strategy=.spread. is not one of"):
        check_config(compose("cluster.placement=[{roles: [policy], strategy: spread}]"))
