"""One role-agnostic group of Ray actor replicas (after OpenRLHF's RayActorGroup).

A group declares its resources from config, restarts dead replicas (`max_restarts`) and retries
their calls (`max_task_retries`); every method the workflows call is a pure function of its
arguments and seeds, so a retried call cannot change or duplicate a result. This is the one
place `ray.get` is called on a role's behalf: workflows see it through the typed groups of
`actors.roles`, so they never touch Ray.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

# How long a call keeps being resent while replicas are unreachable (a node is dying): longer than Ray
# takes to declare a node dead and restart its actors elsewhere, so a lost node costs a wait, not a batch.
UNAVAILABLE_WAIT_S = 300.0


class ActorGroup:
    def __init__(
        self,
        actor_cls: type,
        *,
        role: str,
        replicas: int = 1,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: dict[str, float] | None = None,
        max_restarts: int = 2,
        scheduling: list[Any] | None = None,
        warm: bool = False,
        **init_kwargs: Any,
    ) -> None:
        """`scheduling`: a Ray scheduling strategy per replica (its placement group bundle), or None.
        `warm`: the replicas are detached Ray actors named by a digest of everything that makes them
        (`warm_name`, their placement group and bundle included), found again by a later group with the
        same settings and left running by `shutdown`; `started` counts the replicas this group had to
        start (each one loads its model)."""
        if replicas < 1:
            raise ValueError(f"{role}.replicas must be >= 1, got {replicas}")
        remote_cls = ray.remote(actor_cls)
        options = dict(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources or None,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
            max_concurrency=1,
        )
        if scheduling is not None and len(scheduling) != replicas:
            raise ValueError(f"{role}: {len(scheduling)} placement bundles for {replicas} replicas")
        self.role = role
        self.warm = warm
        # inside a (warm) placement group, the group and bundle are part of what makes a warm actor
        where = None if scheduling is None else [
            (s.placement_group.id.hex(), s.placement_group_bundle_index) for s in scheduling]
        name = warm_name(role, actor_cls, options=options, init=init_kwargs, placement=where) if warm else None
        self.actors, self.started = [], 0
        for i in range(replicas):
            if name is not None:
                try:
                    self.actors.append(ray.get_actor(f"{name}-{i}"))
                    continue
                except ValueError:  # none yet: start it (get_if_exists: another driver may be starting it too)
                    options.update(name=f"{name}-{i}", lifetime="detached", get_if_exists=True)
            extra = {} if scheduling is None else {"scheduling_strategy": scheduling[i]}
            self.actors.append(remote_cls.options(**options, **extra).remote(**init_kwargs))
            self.started += 1
        self._in_flight: list[list[ray.ObjectRef]] = [[] for _ in self.actors]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.actors)

    def __getstate__(self) -> dict[str, Any]:
        # A group crosses to another actor (a Transfer Q* scorer inside a policy actor calls the
        # baseline and reward groups): the handles travel, the local bookkeeping starts afresh.
        return {"role": self.role, "actors": self.actors}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.role, self.actors = state["role"], state["actors"]
        self._in_flight = [[] for _ in self.actors]
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Send one call to the replica with the fewest calls still running."""
        return self._send(method, args, kwargs)[1]

    def _send(self, method: str, args: tuple, kwargs: dict, avoid: set[int] = frozenset()) -> tuple[int, Any]:
        with self._lock:
            for refs in self._in_flight:
                if refs:
                    _, refs[:] = ray.wait(refs, num_returns=len(refs), timeout=0)
            # a replica that was just unreachable is tried last
            index = min(range(len(self.actors)), key=lambda i: (i in avoid, len(self._in_flight[i])))
            ref = getattr(self.actors[index], method).remote(*args, **kwargs)
            self._in_flight[index].append(ref)
        return index, ref

    def run(self, method: str, *args: Any) -> Any:
        """Call `method` on the least busy replica and return its result.

        A replica whose node died stays unreachable until Ray declares the node dead (its health
        checks: 15-30 s) and restarts the actor elsewhere; calls sent to it meanwhile fail with
        ActorUnavailableError after their retries (tried on a 2-node cluster, tests/test_faults.py:
        4 of 72 batches failed that way). Calls are pure, so such a call is sent again, to another
        replica when there is one, until `UNAVAILABLE_WAIT_S` have passed.
        """
        deadline = time.monotonic() + UNAVAILABLE_WAIT_S
        avoid: set[int] = set()
        while True:
            index, ref = self._send(method, args, {}, avoid)
            try:
                return ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                avoid = {index}
                time.sleep(1.0)

    def run_all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(actor, method).remote(*args) for actor in self.actors])

    def shutdown(self) -> None:
        if self.warm:
            return  # left for the next run; `python -m qsteer.cluster.warm stop` ends them
        for actor in self.actors:
            ray.kill(actor)


WARM_PREFIX = "qsteer-warm-"


def warm_name(role: str, actor_cls: type, **settings: Any) -> str:
    """The name of a role's warm actors: a digest of everything their constructor and resources get."""
    import hashlib
    import json

    spec = json.dumps({"class": f"{actor_cls.__module__}.{actor_cls.__qualname__}", **settings}, sort_keys=True,
                      default=str)
    return f"{WARM_PREFIX}{role}-{hashlib.blake2b(spec.encode(), digest_size=6).hexdigest()}"


def attach_drafts(policy: ActorGroup, draft: ActorGroup) -> None:
    """Hand each policy replica a draft replica (round robin), for drafts outside the policy actors."""
    ray.get([
        actor.attach_draft.remote(draft.actors[i % len(draft.actors)]) for i, actor in enumerate(policy.actors)
    ])
