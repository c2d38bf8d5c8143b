"""Role objects held in this process behind the same interface as the Ray group.

`LocalReplicas` gives `PolicyGroup`/`RewardGroup` the Ray group's least-busy dispatch over plain
`Policy`/`Reward` objects. Each replica serves one call at a time, as a Ray actor with
`max_concurrency=1` does, so batches sent from several threads queue for a replica as they
would for an actor. Tests run every workflow on it; `run_job` accepts it in place of Ray.
"""

from __future__ import annotations

import threading
from typing import Any

from qsteer.actors.policy import Policy
from qsteer.actors.reward import Reward
from qsteer.actors.roles import PolicyGroup, RewardGroup, SandboxGroup, ValueGroup
from qsteer.actors.sandbox import Sandbox
from qsteer.actors.value import Value
from qsteer.engines import Engine
from qsteer.rewards import RewardFn


class LocalReplicas:
    def __init__(self, replicas: list[Any]) -> None:
        if not replicas:
            raise ValueError("an in-process group needs at least one replica")
        self.objects = list(replicas)
        self._running = [0] * len(self.objects)
        self._serving = [threading.Lock() for _ in self.objects]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.objects)

    def run(self, method: str, *args: Any) -> Any:
        with self._lock:
            index = min(range(len(self.objects)), key=lambda i: self._running[i])
            self._running[index] += 1
        try:
            with self._serving[index]:
                return getattr(self.objects[index], method)(*args)
        finally:
            with self._lock:
                self._running[index] -= 1

    def run_all(self, method: str, *args: Any) -> list[Any]:
        out = []
        for index, obj in enumerate(self.objects):
            with self._serving[index]:
                out.append(getattr(obj, method)(*args))
        return out

    def shutdown(self) -> None:
        pass  # the objects are the caller's; nothing runs between calls


def local_policy(*engines: Engine) -> PolicyGroup:
    """A policy group with one in-process replica per engine."""
    return PolicyGroup(LocalReplicas([Policy(engine) for engine in engines]))


def local_value(*values: Any) -> ValueGroup:
    """A value group with one in-process replica per `ValueFunction`."""
    return ValueGroup(LocalReplicas([Value(value) for value in values]))


def local_reward(*fns: RewardFn) -> RewardGroup:
    """A reward group with one in-process replica per reward callable."""
    return RewardGroup(LocalReplicas([Reward(fn) for fn in fns]))


def local_sandbox(replicas: int = 1, **kwargs: Any) -> SandboxGroup:
    """A sandbox group with `replicas` in-process `Sandbox` objects (keyword arguments: its limits)."""
    return SandboxGroup(LocalReplicas([Sandbox(**kwargs) for _ in range(replicas)]))
