"""The sandbox's isolation properties, checked from the host: refusal when isolation cannot be
set up, a distinct uid per running sample, a verdict and a test out of the program's reach,
tampering detected, and nothing left behind after many runs."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qsteer.rewards import sandbox
from qsteer.rewards.code_tests import CodeTestsReward
from qsteer.rewards.sandbox import SandboxUnavailable, run_python, run_tests

TIMEOUT_S = 3.0
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


LOAD_SANDBOX = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('sandbox', {sandbox.__file__!r})\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules['sandbox'] = module\n"
    "spec.loader.exec_module(module)\n"
)


def test_refuses_to_run_without_bubblewrap(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "BWRAP_SEARCH_PATH", str(tmp_path))  # a folder with no bwrap in it
    with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
        run_python("print('this must never run')\n")


def test_code_tests_reward_refuses_rather_than_scoring(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "BWRAP_SEARCH_PATH", str(tmp_path))
    reward = CodeTestsReward(timeout_s=TIMEOUT_S)
    with pytest.raises(SandboxUnavailable):
        reward(prompts=[""], completions=["def add(a, b):\n    return a + b\n"], test=[ADD_TEST], entry_point=["add"])


def test_refuses_to_run_where_namespaces_cannot_be_made() -> None:
    # A real environment without user namespaces: this test's own process tree inside a
    # bubblewrap sandbox with --disable-userns, as an unprivileged uid. The sandbox must refuse.
    bwrap = subprocess.run(["which", "bwrap"], capture_output=True, text=True).stdout.strip()
    script = LOAD_SANDBOX + (
        "try:\n"
        "    result = module.run_python(\"print('RAN')\")\n"
        "    print('RAN UNISOLATED', result)\n"
        "except module.SandboxUnavailable as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    argv = [
        bwrap, "--unshare-user", "--disable-userns", "--unshare-pid", "--die-with-parent",
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        "/usr/bin/python3", "-I", "-c", script,
    ]
    ids = {"user": sandbox.UID_BASE - 1, "group": sandbox.UID_BASE - 1, "extra_groups": []} if os.geteuid() == 0 else {}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, **ids)
    assert out.stdout.startswith("REFUSED"), (out.stdout, out.stderr)
    assert "bubblewrap could not set up the sandbox" in out.stdout
    assert "RAN" not in out.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the caller as another user")
def test_an_unprivileged_caller_gets_the_same_walls() -> None:
    script = LOAD_SANDBOX + (
        "good = module.run_tests('def add(a, b):\\n    return a + b\\n', sys.argv[1], 'add')\n"
        "bad = module.run_tests('def add(a, b):\\n    return a - b\\n', sys.argv[1], 'add')\n"
        "print(good.passed, bad.passed, good.net_isolated, good.uid)\n"
    )
    caller = sandbox.UID_BASE - 2
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", script, ADD_TEST],
        capture_output=True, text=True, timeout=60, user=caller, group=caller, extra_groups=[], cwd="/",
    )
    assert out.stdout.split() == ["True", "False", "True", str(caller)], (out.stdout, out.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="distinct uids need root; otherwise samples share the caller's")
def test_running_samples_never_share_a_uid() -> None:
    code = "import os, time\nprint(os.getuid())\ntime.sleep(0.4)\n"
    spans = []
    lock = threading.Lock()

    def one(_: int) -> None:
        started = time.monotonic()
        result = run_python(code, timeout_s=TIMEOUT_S)
        with lock:
            spans.append((result.uid, started, time.monotonic(), result))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, range(8)))
    for uid, start, end, result in spans:
        assert result.passed, result
        assert int(result.stdout.strip()) == uid  # the kernel uid, as the program sees it
        assert sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_SLOTS
        overlapping = [s for s in spans if s[0] == uid and s[1] < end and start < s[2] and s is not (uid, start, end, result)]
        assert all(s[3] is result for s in overlapping), f"uid {uid} was shared by two running samples"


SECRET = "987654321"
STEAL_THE_TEST = f'''
import os, signal
found = None
def look(data):
    global found
    if isinstance(data, str):
        data = data.encode()
    if b"{SECRET[:4]}" + b"{SECRET[4:]}" in data:
        found = int("{SECRET[:4]}" + "{SECRET[4:]}")
def read(path):
    try:
        with open(path, "rb") as f:
            look(f.read(1 << 20))
    except OSError:
        pass
for root in ("/tmp", "/qsteer", "/dev/shm", "/proc/1", "/proc/self"):
    for name in ("cmdline", "environ", "mem", "maps"):
        read(os.path.join(root, name))
for folder in ("/tmp", "/qsteer", "/dev/shm"):
    for dirpath, _, files in os.walk(folder):
        for name in files:
            read(os.path.join(dirpath, name))
for fd in range(0, 64):
    read(f"/proc/1/fd/{{fd}}")
    for verdict in (b'{{"event": "verdict", "passed": true, "reason": "passed"}}\\n',):
        try:
            os.write(fd, verdict)
        except OSError:
            pass
try:
    os.kill(1, signal.SIGKILL)
except OSError:
    pass
def answer():
    return found
'''


def test_the_test_and_the_verdict_are_out_of_the_programs_reach() -> None:
    test = f"def check(candidate):\n    assert candidate() == {SECRET}\n"
    result = run_tests(STEAL_THE_TEST, test, "answer", timeout_s=TIMEOUT_S, audit_hook=False)
    assert not result.passed, result
    # The judge lived to give the verdict (the forged lines reached only the program's own pipe).
    assert not result.timed_out and not result.reason.startswith("the judge"), result.reason


@pytest.mark.parametrize(
    "returns",
    [
        "unittest.mock.ANY",
        "type('L', (list,), {'__eq__': lambda s, o: True})([1])",
        "[1, type('E', (), {'__eq__': lambda s, o: True})()]",
    ],
    ids=["mock.ANY", "list-subclass", "nested"],
)
def test_objects_that_fake_equality_are_tampering(returns: str) -> None:
    solution = f"import unittest.mock\ndef add(a, b):\n    return {returns}\n"
    # A test that swallows every failure still does not pass a tampered value.
    test = "def check(candidate):\n    try:\n        assert candidate(2, 3) == 5\n    except BaseException:\n        pass\n"
    result = run_tests(solution, test, "add", timeout_s=TIMEOUT_S)
    assert not result.passed and result.tampered, result
    assert result.reason.startswith("tampered: add returned"), result.reason


def test_plain_values_cross_exactly() -> None:
    solution = (
        "def echo(x):\n    return x\n"
        "def boom(x):\n    raise ValueError(f'bad {x}')\n"
        "def evens(n):\n    return (i for i in range(n) if i % 2 == 0)\n"
        "import math\nLIMIT = 3\n"
    )
    test = (
        "def check(candidate):\n"
        "    values = [None, True, 0, -2**80, 1.5, float('inf'), 1e-310, 2j, 'é', b'\\x00', bytearray(b'x'),\n"
        "              [1, [2]], (1, (2,)), {1: 'a', (2, 3): {4}}, {1, 2}, frozenset({3})]\n"
        "    for value in values:\n"
        "        out = candidate(value)\n"
        "        assert out == value and type(out) is type(value), (value, out)\n"
        "    assert math.isnan(candidate(float('nan')))\n"
        "    try:\n"
        "        boom(LIMIT)\n"
        "    except ValueError as exc:\n"
        "        assert str(exc) == 'bad 3'\n"
        "    else:\n"
        "        raise AssertionError('boom did not raise')\n"
        "    assert candidate(x=4) == 4\n"
        "    assert list(evens(7)) == [0, 2, 4, 6] and evens(7) != [0, 2, 4, 6]\n"
    )
    result = run_tests(solution, test, "echo", timeout_s=TIMEOUT_S)
    assert result.passed, result


def test_a_program_that_dies_mid_call_fails_even_if_the_test_swallows_it() -> None:
    solution = "import os\ndef add(a, b):\n    os._exit(0)\n"
    test = "def check(candidate):\n    try:\n        candidate(1, 2)\n    except BaseException:\n        pass\n"
    result = run_tests(solution, test, "add", timeout_s=TIMEOUT_S)
    assert not result.passed and "exited" in result.reason, result.reason


def test_a_judged_solution_is_imported_not_run_as_a_script() -> None:
    solution = "def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(input(), 1))\n"
    assert run_tests(solution, ADD_TEST, "add", timeout_s=TIMEOUT_S).passed
    assert not run_python(solution, timeout_s=TIMEOUT_S).passed  # as a script it reads stdin, which is empty


def test_a_deeply_nested_return_value_fails_the_sample_only() -> None:
    solution = "def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n"
    result = run_tests(solution, ADD_TEST, "add", timeout_s=TIMEOUT_S)
    assert not result.passed and result.reason.startswith("output rejected"), result.reason


# The 500-run leak check runs on the pool of sandbox actors: tests/test_sandbox_pool.py.
