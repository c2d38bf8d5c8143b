"""The sandbox pool: verdicts with faults told apart from failures, the (code, test) cache, and
(`ray`) two Sandbox actors running 500 candidates, hostile ones included, leaving nothing behind."""

from __future__ import annotations

import glob
import os
import time

import psutil
import pytest
from test_sandbox_attacks import ADD_TEST, RIGHT_ADD, SWITCH_OFF_HOOK, WRONG_ADD

from qsteer.actors.local import local_sandbox
from qsteer.actors.sandbox import Job

LOOP = "def add(a, b):\n    while True:\n        pass\n"
MEMORY = "def add(a, b):\n    return len(bytearray(10**10))\n"


def test_faults_are_reported_apart_from_failing_programs() -> None:
    pool = local_sandbox(1, timeout_s=1.0, workers=2)
    right, wrong, loop, memory = pool.run([Job(code, ADD_TEST, "add") for code in (RIGHT_ADD, WRONG_ADD, LOOP, MEMORY)])
    assert (right.passed, right.fault) == (True, None)
    assert (wrong.passed, wrong.fault) == (False, None) and "AssertionError" in wrong.reason
    assert (loop.passed, loop.fault) == (False, "timeout")
    assert (memory.passed, memory.fault) == (False, "oom"), memory.reason


def test_verdicts_are_cached_by_code_and_test() -> None:
    pool = local_sandbox(2, timeout_s=1.0)
    jobs = [Job(RIGHT_ADD, ADD_TEST, "add"), Job(WRONG_ADD, ADD_TEST, "add"), Job(RIGHT_ADD, ADD_TEST, "add")]
    first = pool.run(jobs)
    assert sum(info["executions"] for info in pool.info()) == 2  # the repeated job ran once
    assert pool.run(jobs) == first
    assert sum(info["executions"] for info in pool.info()) == 2 and (pool.hits, pool.misses) == (4, 2)
    other_test = Job(RIGHT_ADD, "def check(candidate):\n    assert candidate(1, 1) == 3\n", "add")
    assert pool.run([other_test])[0].passed is False  # a different test is a different key


def files_open(pid: int) -> list[str]:
    """The files, pipes and memfds a process holds (Ray's own sockets and event fds come and go)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not target.startswith(("socket:", "anon_inode:")):
            targets.append(target)
    return sorted(targets)


@pytest.mark.ray
@pytest.mark.heavy
def test_two_actors_run_500_candidates_and_leave_nothing(ray_session) -> None:
    from qsteer.actors.group import ActorGroup
    from qsteer.actors.roles import SandboxGroup
    from qsteer.actors.sandbox import Sandbox

    marker = f"qsteer_leak_{os.getpid()}"
    sleeper = f"{time.time() % 1000 + 2000:.6f}"  # a unique argument to `sleep`, to find it by
    hostile = {
        # the hook switched off, then a setsid grandchild that would outlive the sample
        0: SWITCH_OFF_HOOK + "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
           f"        os.execv('/bin/sleep', ['sleep', '{sleeper}'])\n    os._exit(0)\n" + RIGHT_ADD,
        1: SWITCH_OFF_HOOK + "import os\nfor folder in ('/tmp', '/dev/shm'):\n"
           f"    open(os.path.join(folder, '{marker}'), 'w').write('x')\n" + RIGHT_ADD,
        2: WRONG_ADD,
    }
    codes = []
    for i in range(500):
        if i % 100 == 3:
            code = LOOP
        elif i % 100 == 4:
            code = MEMORY
        else:
            code = hostile.get(i % 10, RIGHT_ADD)
        codes.append(f"# candidate {i}\n{code}")  # distinct texts: the cache must not hide any run
    pool = SandboxGroup(ActorGroup(Sandbox, role="sandbox", replicas=2, num_cpus=0.5, timeout_s=2.0, workers=2))
    pids = [info["pid"] for info in pool.info()]
    # warm up: what the sandbox keeps for a process's lifetime (the uid lock folder) opens now
    pool.run([Job(f"# warm-up {i}\n{RIGHT_ADD}", ADD_TEST, "add") for i in range(8)])
    fds_before = {pid: files_open(pid) for pid in pids}
    mounts_before = {pid: open(f"/proc/{pid}/mountinfo").read() for pid in pids}
    try:
        verdicts = pool.run([Job(code, ADD_TEST, "add") for code in codes])
        executions = [info["executions"] for info in pool.info()]
    finally:
        time.sleep(0.3)
        fds_after = {pid: files_open(pid) for pid in pids}
        mounts_after = {pid: open(f"/proc/{pid}/mountinfo").read() for pid in pids}
        pool.shutdown()
    assert sum(executions) == 508 and min(executions) > 0  # both actors worked
    for i, v in enumerate(verdicts):
        if i % 100 == 3:
            assert (v.passed, v.fault) == (False, "timeout")
        elif i % 100 == 4:
            assert (v.passed, v.fault) == (False, "oom"), v.reason
        elif v.fault is not None:
            # on a loaded machine a sound sample may miss its deadline: a fault, never a verdict
            assert (v.passed, v.fault) == (False, "timeout"), (i, v)
        else:
            assert v.passed == (i % 10 != 2), (i, v.reason)
    assert sum(v.fault is None for v in verdicts) >= 450
    namespaces = {v.pid_namespace for v in verdicts if v.pid_namespace}

    def leftovers() -> list[tuple]:
        left = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                namespace = os.stat(f"/proc/{proc.pid}/ns/pid").st_ino
            except OSError:
                continue
            if namespace in namespaces or sleeper in " ".join(proc.info["cmdline"] or []):
                left.append((proc.pid, proc.info["cmdline"], namespace in namespaces))
        return left

    # a process seen in a namespace the kernel has since recycled for another helper's sample
    # is gone a moment later; one that outlived its sample is still there
    left = leftovers()
    if left:
        time.sleep(2)
        left = [item for item in leftovers() if item in left]
    assert left == []
    assert glob.glob(f"/tmp/{marker}*") + glob.glob(f"/dev/shm/{marker}*") == []
    assert fds_after == fds_before and mounts_after == mounts_before  # nothing leaked in the actors
