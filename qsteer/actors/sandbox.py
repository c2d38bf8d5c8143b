"""The sandbox role: runs model-written code against tests, in actors beside the policy.

`Sandbox` judges a batch of jobs (solution, test, entry point) with `rewards.sandbox.run_tests`,
`workers` samples at a time (threads suffice: each waits on its own bubblewrap process). Each
verdict says whether the program passed and, apart from that, whether the sandbox itself
failed to judge it (`fault`): a timeout, a kill (signal, CPU limit), running out of memory,
or isolation that could not be set up. A wrong answer is `passed=False, fault=None`; a fault
is not evidence about the program's correctness, and the workflows count it separately.

A Ray replica of the `sandbox=` group (or a test's in-process group) hosts a `Sandbox`. The results cache keyed by the job's hash lives
in the typed group (`roles.SandboxGroup`), on the caller's side, so that every replica's work
is shared and a repeated (code, tests) pair is never sent to an actor at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from qsteer.rewards.sandbox import SandboxResult, SandboxUnavailable, run_tests

FAULTS = ("timeout", "killed", "oom", "judge_error", "unavailable")


@dataclass(frozen=True)
class Job:
    """One program to judge: the solution's full text, a HumanEval-style or assert-only test."""

    solution: str
    test: str
    entry_point: str

    def key(self) -> str:
        """The results-cache key: a hash of exactly what decides the verdict."""
        text = json.dumps([self.solution, self.test, self.entry_point])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    fault: str | None = None
    """None for a judged program (passed or failed); else one of FAULTS: the sandbox could not judge it."""
    wall_s: float = 0.0
    tampered: bool = False
    pid_namespace: int = 0
    """The sample's pid namespace (inode): a leak check looks for processes left in it."""
    uid: int = -1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def classify(result: SandboxResult) -> Verdict:
    """A run's verdict, with the faults (timeout, kill, memory) told apart from a failing program."""
    fault = None
    if result.timed_out:
        fault = "timeout"
    elif "MemoryError" in result.reason:
        fault = "oom"
    elif "killed by signal" in result.reason:
        fault = "killed"
    elif "without a verdict" in result.reason:
        fault = "judge_error"
    return Verdict(passed=result.passed and fault is None, reason=result.reason, fault=fault,
                   wall_s=round(result.wall_s, 4), tampered=result.tampered,
                   pid_namespace=result.pid_namespace, uid=result.uid)


class Sandbox:
    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
                 workers: int = 2) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_processes = max_processes
        self.workers = max(1, workers)
        self.calls = 0
        self.executions = 0

    def info(self) -> dict[str, Any]:
        return {"calls": self.calls, "executions": self.executions, "pid": os.getpid()}

    def run(self, jobs: list[Job]) -> list[Verdict]:
        """One verdict per job, in order; the sandbox's own failures come back as faults, never raised."""
        self.calls += 1
        self.executions += len(jobs)
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(jobs)))) as pool:
            return list(pool.map(self._one, jobs))

    def _one(self, job: Job) -> Verdict:
        try:
            result = run_tests(job.solution, job.test, job.entry_point, timeout_s=self.timeout_s,
                               memory_mb=self.memory_mb, max_processes=self.max_processes)
        except SandboxUnavailable as err:
            return Verdict(passed=False, reason=str(err), fault="unavailable")
        return classify(result)
