"""The basic_code dataset: every problem's reference solution passes its hidden and public
tests and its docstring examples, and a body that returns None fails all of them.

The code run here is OURS (the canonical solutions shipped in qsteer/data/basic_code.jsonl
and a fixed wrong body), never model output, so it runs through Python's `exec` in one child
process with a timeout rather than through the sandbox, which guards model code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qsteer.data import BASIC_CODE_FILE, DatasetError, load_dataset

# Runs in a child process: reads the problems on stdin, prints one verdict per problem.
CHECKER = r'''
import contextlib, doctest, io, json, sys

def passes(source, run):
    namespace = {}
    try:
        exec(source, namespace)
        run(namespace)
        return True
    except Exception:
        return False

def public(problem):
    return lambda namespace: [exec(test, namespace) for test in problem["public_tests"]]

def hidden(problem):
    return lambda namespace: namespace["check"](namespace[problem["entry_point"]])

def examples(problem, source):
    namespace = {}
    exec(source, namespace)
    function = namespace[problem["entry_point"]]
    runner = doctest.DocTestRunner(verbose=False)
    for test in doctest.DocTestFinder().find(function, problem["entry_point"], globs=namespace):
        with contextlib.redirect_stdout(io.StringIO()):
            runner.run(test)
    return runner.summarize(verbose=False)

verdicts = {}
for problem in json.load(sys.stdin):
    right = problem["prompt"] + problem["canonical_solution"]
    wrong = problem["prompt"] + "    return None\n"
    failed, attempted = examples(problem, right)
    verdicts[problem["id"]] = {
        "hidden": passes(right + problem["test"], hidden(problem)),
        "public": passes(right, public(problem)),
        "doctest_failed": failed,
        "doctest_attempted": attempted,
        "wrong_hidden": passes(wrong + problem["test"], hidden(problem)),
        "wrong_public": passes(wrong, public(problem)),
    }
print(json.dumps(verdicts))
'''


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    with BASIC_CODE_FILE.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def verdicts(problems) -> dict[str, dict]:
    completed = subprocess.run(
        [sys.executable, "-c", CHECKER], input=json.dumps(problems), capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_problems_have_the_humaneval_fields_and_public_tests(problems):
    assert len(problems) >= 60
    assert len({problem["id"] for problem in problems}) == len(problems)
    assert len({problem["entry_point"] for problem in problems}) == len(problems)
    for problem in problems:
        assert set(problem) == {"id", "prompt", "entry_point", "test", "canonical_solution", "public_tests"}
        assert problem["prompt"].startswith(f"def {problem['entry_point']}(")
        assert problem["test"].count("assert ") > len(problem["public_tests"]) >= 1, problem["id"]
        # Each public test is one of the docstring examples, so selecting on them uses no hidden test.
        for test in problem["public_tests"]:
            call = test.removeprefix("assert ").split(" == ")[0]
            assert f">>> {call}\n" in problem["prompt"], (problem["id"], test)


def test_reference_solutions_pass_hidden_public_and_docstring_tests(verdicts):
    assert len(verdicts) >= 60
    for problem_id, verdict in verdicts.items():
        assert verdict["hidden"], f"{problem_id}: canonical solution fails its hidden tests"
        assert verdict["public"], f"{problem_id}: canonical solution fails its public tests"
        assert verdict["doctest_attempted"] >= 1 and verdict["doctest_failed"] == 0, problem_id


def test_a_wrong_body_fails_hidden_and_public_tests(verdicts):
    for problem_id, verdict in verdicts.items():
        assert not verdict["wrong_hidden"], f"{problem_id}: `return None` passes the hidden tests"
        assert not verdict["wrong_public"], f"{problem_id}: `return None` passes the public tests"


def test_loader_gives_humaneval_shaped_records_with_public_tests(problems):
    records = load_dataset("basic_code")
    assert [record["id"] for record in records] == [problem["id"] for problem in problems]
    first, problem = records[0], problems[0]
    assert first["prompt_code"] == problem["prompt"]
    assert problem["prompt"].rstrip() in first["prompt"]
    assert first["public_tests"] == problem["public_tests"]
    assert (first["test"], first["entry_point"]) == (problem["test"], problem["entry_point"])
    assert len(load_dataset("basic_code", limit=5)) == 5


def test_loader_names_a_record_without_public_tests(tmp_path, problems):
    broken = {key: value for key, value in problems[0].items() if key != "public_tests"}
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(broken) + "\n")
    with pytest.raises(DatasetError, match=r"BasicCode/0.*public_tests"):
        load_dataset("basic_code", path=str(path))
