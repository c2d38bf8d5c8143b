"""Actor groups: a replica that dies restarts, and the call it was serving is retried."""

from __future__ import annotations

import time

import pytest
import ray

from qsteer.actors.group import ActorGroup
from qsteer.actors.policy import PolicyActor
from qsteer.engines import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.model]


def test_killed_replica_restarts_and_its_call_is_retried(ray_session):
    group = ActorGroup(PolicyActor, role="model", replicas=1, num_cpus=1, max_restarts=1, num_threads=1)
    try:
        first_pid = group.run_all("info")[0]["pid"]
        ids = group.run("encode", ["Write a short poem about rivers."])
        params = SamplingParams(n=2, max_new_tokens=48, seed=5)
        in_flight = group.call("generate", ids, params, ["poem"])
        time.sleep(1.0)
        assert not ray.wait([in_flight], timeout=0)[0], "the call should still be running"
        ray.kill(group.actors[0], no_restart=False)
        retried = ray.get(in_flight, timeout=300)
        assert group.run_all("info")[0]["pid"] != first_pid
        again = group.run("generate", ids, params, ["poem"])
        # the retry is the same pure function of (ids, params, keys): nothing differs or doubles
        assert [c.token_ids for c in retried[0]] == [c.token_ids for c in again[0]]
        assert len(retried[0]) == 2
    finally:
        group.shutdown()
