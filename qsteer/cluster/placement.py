"""Placement as data: which role's actors go where, planned and checked before any actor starts.

`cluster.placement` lists placement groups (after veRL's role-to-resource-pool mapping and
OpenRLHF's colocated actor groups): each names roles and a Ray strategy; bundle i holds replica
i of each of its roles, with the sum of their resources, so colocating the policy with its draft
on one GPU is `{roles: [policy, draft]}` with fractional `num_gpus`, and spreading the policy's
replicas over nodes is `{roles: [policy], strategy: STRICT_SPREAD}`. A role in no group is placed
by Ray freely.

`plan_placement` is pure: it lays the bundles and free actors onto the nodes' total resources
as the strategies require and raises `PlacementError` naming the role that does not fit. Ray
itself would instead wait forever for an infeasible placement group or actor. `reserve` then
creates the placement groups in Ray, and the actor groups start inside their bundles. The plan's
nodes are where the plan fits, not a promise of where Ray puts each bundle (Ray picks among the
nodes that fit); `tests/test_cluster.py` reads the actors' nodes back from Ray's state API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Where each role's resource keys live in the config.
ROLE_KEYS = {"policy": "model", "draft": "draft.actor", "reward": "reward", "value": "value", "trainer": "value",
             "sandbox": "sandbox", "candidate": "model", "baseline": "baseline", "baseline_reward": "baseline.reward",
             "baseline_trainer": "model"}
# Ray refuses an empty bundle; a bundle of actors that ask for nothing (the reward's default
# num_cpus=0) reserves this sliver of a CPU instead.
EMPTY_BUNDLE_CPU = 0.01
_EPS = 1e-9


class PlacementError(ValueError):
    """The cluster cannot hold the plan; the message names the role (and placement group). Raised
    before any actor starts, so the command exits as on a config error."""


@dataclass(frozen=True)
class Demand:
    """One role's actors: how many, and what each asks of Ray."""

    role: str
    replicas: int
    num_cpus: float
    num_gpus: float

    @property
    def key(self) -> str:
        return ROLE_KEYS[self.role]

    def per_actor(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v}

    def describe(self) -> str:
        return (f"{self.key}.replicas={self.replicas} x {self.key}.num_cpus={self.num_cpus:g}, "
                f"{self.key}.num_gpus={self.num_gpus:g}")


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    resources: dict[str, float]

    def label(self, index: int) -> str:
        return f"node {index} ({self.address}, {self.node_id[:8]})"


@dataclass(frozen=True)
class Slot:
    """Where one actor goes: its placement group and bundle (None when placed freely) and node."""

    role: str
    replica: int
    group: int | None
    bundle: int | None
    node: int


@dataclass
class Plan:
    demands: list[Demand]
    nodes: list[Node]
    slots: list[Slot] = field(default_factory=list)
    bundles: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # per group: its bundles

    def rows(self) -> list[dict[str, Any]]:
        by_role = {d.role: d for d in self.demands}
        return [{"role": s.role, "replica": s.replica, "resources": by_role[s.role].per_actor(),
                 "placement_group": s.group, "bundle": s.bundle, "node": s.node,
                 "node_id": self.nodes[s.node].node_id} for s in self.slots]

    def table(self) -> str:
        lines = ["role      replica  resources           placement      node"]
        by_role = {d.role: d for d in self.demands}
        for s in self.slots:
            resources = ", ".join(f"{k}={v:g}" for k, v in by_role[s.role].per_actor().items()) or "none"
            where = "free" if s.group is None else f"group {s.group} bundle {s.bundle}"
            lines.append(f"{s.role:<9} {s.replica:<8} {resources:<19} {where:<14} {self.nodes[s.node].label(s.node)}")
        totals = ", ".join(f"{k}={v:g}" for k, v in _total([n.resources for n in self.nodes]).items()
                           if k in ("CPU", "GPU"))
        lines.append(f"the cluster's {len(self.nodes)} node(s) ({totals}) can hold this plan")
        return "\n".join(lines)


def _total(items: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        for k, v in item.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in need.items())


def _take(need: dict[str, float], free: dict[str, float]) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _show(resources: dict[str, float]) -> str:
    """CPUs and GPUs (Ray's memory and node-label resources are not asked for here)."""
    return ", ".join(f"{k}={resources.get(k, 0.0):g}" for k in ("CPU", "GPU") if k in resources) or "nothing"


def bundle_of(demands: list[Demand]) -> dict[str, float]:
    """One bundle: one replica of each role in it."""
    need = _total([d.per_actor() for d in demands])
    return need if any(need.values()) else {"CPU": EMPTY_BUNDLE_CPU}


def plan_placement(demands: list[Demand], groups: tuple[Any, ...], nodes: list[Node]) -> Plan:
    """Lay every actor onto `nodes` as `groups` (cluster.placement) say; PlacementError naming the role if
    one does not fit. Groups first, in config order, then the free roles' actors, first fit."""
    if not nodes:
        raise PlacementError("the cluster has no alive node")
    plan = Plan(demands, nodes)
    free = [dict(n.resources) for n in nodes]
    by_role = {d.role: d for d in demands}
    grouped: set[str] = set()
    for index, group in enumerate(groups):
        members = [by_role[r] for r in group.roles if r in by_role]  # roles this workflow does not run are left out
        grouped.update(d.role for d in members)
        if not members:
            continue
        where = f"cluster.placement[{index}] (roles {', '.join(d.role for d in members)})"
        if len({d.replicas for d in members}) > 1:
            raise PlacementError(f"{where}: bundle i holds replica i of each role, so their replicas must be "
                                 f"equal: {'; '.join(d.describe() for d in members)}")
        bundle = bundle_of(members)
        count = members[0].replicas
        plan.bundles[index] = [dict(bundle) for _ in range(count)]
        placed = _place_bundles(bundle, count, group.strategy, free, where, members)
        for b, node in enumerate(placed):
            plan.slots += [Slot(d.role, b, index, b, node) for d in members]
    for demand in demands:
        if demand.role in grouped:
            continue
        need = demand.per_actor()
        for replica in range(demand.replicas):
            node = next((i for i, f in enumerate(free) if _fits(need, f)), None)
            if node is None:
                raise PlacementError(
                    f"role {demand.role} ({demand.describe()}): replica {replica} fits on no node of the cluster "
                    f"(free: {_free_text(free)}); lower {demand.key}.replicas or its resources, or add nodes")
            _take(need, free[node])
            plan.slots.append(Slot(demand.role, replica, None, None, node))
    return plan


def _free_text(free: list[dict[str, float]]) -> str:
    return "; ".join(f"node {i}: {_show(f)}" for i, f in enumerate(free))


def _place_bundles(bundle: dict[str, float], count: int, strategy: str, free: list[dict[str, float]],
                   where: str, members: list[Demand]) -> list[int]:
    """The node of each bundle, taken from `free`."""
    roles = ", ".join(d.role for d in members)
    total = {k: v * count for k, v in bundle.items()}
    if strategy in ("STRICT_PACK", "PACK"):
        node = next((i for i, f in enumerate(free) if _fits(total, f)), None)
        if node is not None:
            _take(total, free[node])
            return [node] * count
        if strategy == "STRICT_PACK":
            raise PlacementError(f"{where}: STRICT_PACK puts all {count} bundles ({_show(total)} in all, for "
                                 f"role(s) {roles}) on one node, and no node has that free ({_free_text(free)})")
    placed: list[int] = []
    for b in range(count):
        candidates = [i for i, f in enumerate(free) if _fits(bundle, f)]
        if strategy == "STRICT_SPREAD":
            candidates = [i for i in candidates if i not in placed]
        elif strategy == "SPREAD":
            candidates.sort(key=lambda i: (placed.count(i), i))
        if not candidates:
            rule = "no node left that holds none of its other bundles (STRICT_SPREAD)" \
                if strategy == "STRICT_SPREAD" else "no node"
            raise PlacementError(f"{where}: bundle {b} (replica {b} of role(s) {roles}: {_show(bundle)}) fits on "
                                 f"{rule}; {len(free)} node(s), free: {_free_text(free)}; lower the replicas "
                                 f"or resources of {roles}, or add nodes")
        _take(bundle, free[candidates[0]])
        placed.append(candidates[0])
    return placed


# -- from the config and from Ray ------------------------------------------------------------------------


def role_demands(cfg: Any, roles: tuple[str, ...], draft: dict | None, has_gpu: bool) -> list[Demand]:
    """The actors a run starts, with the resources `run.build_roles` gives them."""
    out = []
    if "policy" in roles:
        m = cfg.model
        engine_kwargs = m.engine_kwargs or {}
        own_gpu = has_gpu and not (m.engine == "vllm" and int(engine_kwargs.get("tensor_parallel_size", 1)) > 1)
        gpus = (1 if own_gpu else 0) if m.num_gpus == "auto" else m.num_gpus
        out.append(Demand("policy", m.replicas, float(m.num_cpus), float(gpus)))
        if draft is not None and draft["kind"] == "model" and not draft.get("colocate", True) and m.engine == "hf":
            a = cfg.draft.actor
            gpus = (1 if has_gpu else 0) if a.num_gpus == "auto" else a.num_gpus
            out.append(Demand("draft", a.replicas, float(a.num_cpus), float(gpus)))
    if "reward" in roles:
        r = cfg.reward
        gpus = (1 if has_gpu else 0) if r.num_gpus == "auto" else r.num_gpus
        out.append(Demand("reward", r.replicas, float(r.num_cpus), float(gpus)))
    return out


def ray_nodes() -> list[Node]:
    """The connected cluster's alive nodes with their total resources, in a stable order."""
    import ray

    nodes = [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
             for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: (n.address, n.node_id))


@dataclass
class Reservation:
    """Placement groups held in Ray for one run, and each role's scheduling strategy per replica.
    `groups` end with the run; `kept` are warm groups (detached), left for the next run."""

    groups: list[Any] = field(default_factory=list)
    strategies: dict[str, list[Any]] = field(default_factory=dict)
    kept: list[Any] = field(default_factory=list)

    def shutdown(self) -> None:
        from ray.util import remove_placement_group

        for group in self.groups:
            remove_placement_group(group)
        self.groups.clear()


# Warm placement groups: detached and named, like the warm actors inside them (`actors.group.warm_name`).
WARM_GROUP_PREFIX = "qsteer-warm-pg-"


def warm_group_name(config: Any, bundles: list[dict[str, float]], roles_config: Any) -> str:
    """The name of a warm placement group: a digest of its strategy, roles and bundles and of the config of
    the roles in it, so that actors of another model config get a group of their own instead of waiting
    for the bundles the old actors hold."""
    import hashlib
    import json

    spec = json.dumps({"roles": list(config.roles), "strategy": config.strategy, "bundles": bundles,
                       "roles_config": roles_config}, sort_keys=True, default=str)
    return f"{WARM_GROUP_PREFIX}{hashlib.blake2b(spec.encode(), digest_size=6).hexdigest()}"


def reserve(plan: Plan, groups: tuple[Any, ...], timeout_s: float = 120.0, into: Reservation | None = None,
            warm: dict[int, Any] | None = None) -> Reservation:
    """Create the plan's placement groups and wait until Ray has reserved them.

    `warm` (placement group index -> the config of its roles) makes those groups warm: detached, named
    `warm_group_name`, found again by a later run with the same plan and config, and left in Ray
    after the run (`python -m qsteer.cluster.warm stop` removes them with their actors).
    """
    import ray
    from ray.util.placement_group import get_placement_group, placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    reservation = into if into is not None else Reservation()
    for index, bundles in plan.bundles.items():
        config = groups[index]
        if warm is not None and index in warm:
            name = warm_group_name(config, bundles, warm[index])
            try:
                group = get_placement_group(name)
            except ValueError:  # none yet: this run makes it
                group = placement_group(bundles, strategy=config.strategy, name=name, lifetime="detached")
            reservation.kept.append(group)
        else:
            group = placement_group(bundles, strategy=config.strategy)
            reservation.groups.append(group)
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            raise PlacementError(
                f"cluster.placement[{index}] (roles {', '.join(config.roles)}): Ray did not reserve its "
                f"{len(bundles)} bundle(s) ({_show(bundles[0])} each, {config.strategy}) within {timeout_s:g} s; "
                "the cluster can hold them, so other jobs (or warm actors of another config: "
                "`python -m qsteer.cluster.warm list`) hold the resources now")
        roles = sorted({s.role for s in plan.slots if s.group == index})
        for role in roles:
            reservation.strategies[role] = [
                PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b) for b in range(len(bundles))
            ]
    return reservation
