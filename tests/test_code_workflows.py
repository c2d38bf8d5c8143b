"""repeated_sampling, ideasearch and plansearch with a scripted policy (fixed replies) and the real sandbox.

The scripted policy (tests/scripted_policy.py) stands in for the model only: the workflows,
the prompts, the list parsing, the observation tree and the sandbox group are the real ones.
Checked: one batched policy call per stage for the whole batch, each stage's conversation
structure, the observation tree's counts under the reference's rules, the unparseable-list
fallback with its retry temperatures, the ablations, `workflow.n` codes per problem, selection
by the public tests, and resuming without redoing finished stages.
"""

from __future__ import annotations

import json
from math import comb

import pytest
from scripted_policy import ScriptedPolicy, stage_of

from qsteer.actors.local import local_sandbox
from qsteer.data import load_dataset
from qsteer.run import context
from qsteer.workflows import WORKFLOWS
from qsteer.workflows import plansearch_prompts as P
from qsteer.workflows.code_search import StageStore, public_tests

RIGHT = {"reverse_string": "def reverse_string(s):\n    return s[::-1]\n",
         "sum_of_evens": "def sum_of_evens(numbers):\n    return sum(x for x in numbers if x % 2 == 0)\n"}
WRONG = {"reverse_string": "def reverse_string(s):\n    return s\n",
         "sum_of_evens": "def sum_of_evens(numbers):\n    return sum(numbers)\n"}
UNPARSEABLE_FOR = "first A"  # the layer-1 node given exactly this observation never writes a list


def entry_point(conversation: list[dict]) -> str:
    return next(name for name in RIGHT if name in conversation[1]["content"])


def reply(conversation: list[dict], temperature: float, key: str, sample: int) -> str:
    stage = stage_of(conversation)
    if stage == "format":
        task = conversation[1]["content"]
        if conversation[0]["content"] == P.OBSERVER_SYSTEM:
            return '```python\n["first A", "first B"]\n```'
        if UNPARSEABLE_FOR in task and "first B" not in task:
            return "I would rather not write a list."
        tag = abs(hash(task)) % 10**8
        return f'Here:\n```python\n["second {tag} x", "second {tag} y"]\n```'
    if stage in ("code", "direct"):
        slot = int(key.rsplit("/", 1)[-1]) if stage == "code" else sample
        code = RIGHT if slot % 2 == 0 else WRONG
        return f"```python\n{code[entry_point(conversation)]}```"
    return {"observe": "Observations, with reasons.", "combine": "Implications and new observations.",
            "list": "- one\n- two", "filter": "- one", "sketch": "SKETCH: reverse by slicing.",
            "critique": "CRITIQUE: empty input.", "fix": "FIXED: handle empty input.",
            "pseudocode": "PSEUDO: return reversed", "idea": "IDEA: a plain loop."}[stage]


@pytest.fixture(scope="module")
def records():
    return load_dataset("basic_code", limit=2)


@pytest.fixture(scope="module")
def sandbox():
    return local_sandbox(1, workers=2, timeout_s=5.0)


@pytest.fixture
def run(compose, sandbox, tmp_path):
    def _run(records, *overrides, store=None):
        cfg = compose(*overrides, "generation.temperature=0.8")
        policy = ScriptedPolicy(reply)
        ctx = context(cfg, {"policy": policy, "sandbox": sandbox}, None, None)
        ctx.stages = store
        return WORKFLOWS[cfg.workflow.name].run(records, ctx), policy

    return _run


def roles(conversation: list[dict]) -> list[str]:
    return [m["role"] for m in conversation]


def test_plansearch_stages_tree_and_fallback(run, records):
    rows, policy = run(records, "workflow=plansearch", "workflow.n=4", "workflow.num_observations=2")
    stages = policy.stages()
    # the tree: 4 calls per layer (observations, list, filter, format) + 2 list retries on layer 2
    assert stages[:4] == [{"observe"}, {"list"}, {"filter"}, {"format"}]
    assert stages[4:10] == [{"combine"}, {"list"}, {"filter"}, {"format"}, {"format"}, {"format"}]
    assert [c.temperature for c in policy.calls[:10]] == [0.8, 0.8, 0.8, 0.0, 0.8, 0.8, 0.8, 0.0, 0.2, 0.4]
    assert [len(c.conversations) for c in policy.calls[4:10]] == [8, 8, 8, 8, 2, 2]  # 4 nodes x 2 problems
    fixed = any(s[2] == "fixed" for r in rows for s in r["stages"]["slots"])
    assert stages[10:] == [{"sketch"}, *([{"critique"}, {"fix"}] if fixed else []), {"pseudocode"}, {"code"}]
    for call in policy.calls:  # every stage serves both problems in one batched call
        assert {entry_point(c) for c in call.conversations} == set(RIGHT)
    # conversation structure: the list turns continue the observation conversation
    assert roles(policy.calls[3].conversations[0]) == ["system", "user"] + ["assistant", "user"] * 3
    assert policy.calls[3].conversations[0][-1]["content"] == P.AS_PYTHON_LIST
    if fixed:
        fix = policy.calls[12].conversations[0]
        assert roles(fix) == ["system", "user", "assistant", "user"] and fix[2]["content"].startswith("CRITIQUE")
    assert all("PSEUDO" in c[1]["content"] for c in policy.calls[-1].conversations)
    for row in rows:
        # tree counts under the reference's rules: 2 first-order observations give 4 layer-1 nodes
        # (subsets of size 0..2); 3 of them derive 2 second-order ones, the unparseable one none.
        n1, seconds = 2, [2, 2, 2, 0]
        assert row["observation_tree"]["unique_tuples"] == 1 + n1 + comb(n1, 2) + sum(k + comb(k, 2) for k in seconds)
        assert row["observation_tree"]["nodes"] == 1 + 4 + sum(1 + k + comb(k, 2) for k in seconds)
        tree = row["stages"]["tree"]["root"]
        failed = [c for c in tree["children"] if c["given"] == [UNPARSEABLE_FOR]]
        assert len(failed) == 1 and failed[0]["derived"] == [] and failed[0]["log"]["parsed"] is False
        assert len(failed[0]["log"]["list_attempts"]) == 3
        assert [c["given"] for c in failed[0]["children"]] == [[]]  # the search goes on from the empty tuple
        assert len(row["candidates"]) == 4
        assert row["candidates"][row["selected"]]["passed_public"] and row["reward"] == 1.0
        assert [c["passed"] for c in row["candidates"]] == [True, False, True, False]


def test_plansearch_ablations(run, records):
    _, policy = run(records, "workflow=plansearch", "workflow.n=3", "workflow.num_observations=2",
                    "workflow.layers=1", "workflow.without_fix_idea=true")
    assert policy.stages()[4:] == [{"sketch"}, {"pseudocode"}, {"code"}]
    rows, policy = run(records, "workflow=plansearch", "workflow.n=3", "workflow.num_observations=2",
                       "workflow.layers=1", "workflow.without_pseudocode=true", "workflow.without_fix_idea=true")
    assert policy.stages()[4:] == [{"sketch"}, {"code"}]
    assert all("SKETCH" in c[1]["content"] for c in policy.calls[-1].conversations)
    rows, policy = run(records, "workflow=plansearch", "workflow.n=3", "workflow.num_observations=2",
                       "workflow.layers=1", "workflow.without_idea=true")
    assert policy.stages()[4:] == [{"code"}]
    assert rows[0]["observation_tree"]["unique_tuples"] == 4
    for conversation, slot in zip(policy.calls[-1].conversations, rows[0]["stages"]["slots"], strict=False):
        assert all(f"- {o}" in conversation[1]["content"] for o in slot[0])
    assert all(s[2] == "original" for s in rows[0]["stages"]["slots"])


def test_baselines_make_n_codes_in_one_call_per_stage(run, records):
    rows, policy = run(records, "workflow=repeated_sampling", "workflow.n=4")
    assert policy.stages() == [{"direct"}] and policy.calls[0].n == 4 and len(policy.calls[0].conversations) == 2
    assert [[c["passed"] for c in r["candidates"]] for r in rows] == [[True, False, True, False]] * 2
    rows, policy = run(records, "workflow=ideasearch", "workflow.n=4")
    assert policy.stages() == [{"idea"}, {"code"}]
    assert len(policy.calls[1].conversations) == 8 and all("IDEA" in c[1]["content"]
                                                           for c in policy.calls[1].conversations)
    for row in rows:
        assert len(row["candidates"]) == 4 and row["stats"]["generated_tokens"] > 0
        assert row["stages"]["sketch"] == ["IDEA: a plain loop."] * 4


def test_plansearch_resumes_without_redoing_finished_stages(run, records, tmp_path):
    store = StageStore(tmp_path / "stages")
    args = ("workflow=plansearch", "workflow.n=2", "workflow.num_observations=2", "workflow.layers=1")
    first, _ = run(records, *args, store=store)
    again, policy = run(records, *args, store=store)
    assert policy.calls == [] and [r["candidates"] for r in again] == [r["candidates"] for r in first]
    for record in records:  # as if the run died after the sketches
        state = store.load(record["id"])
        for stage in ("pseudocode", "code", "critique", "fix"):
            state.pop(stage, None)
        store.save(record["id"], state)
    resumed, policy = run(records, *args, store=store)
    assert policy.stages()[-2:] == [{"pseudocode"}, {"code"}] and {"observe", "sketch"}.isdisjoint(
        set().union(*policy.stages()))
    assert json.dumps([r["candidates"] for r in resumed]) == json.dumps([r["candidates"] for r in first])


def test_public_tests_come_from_the_record_or_the_docstring(records):
    assert public_tests(records[0]) == ["assert reverse_string('abc') == 'cba'"]
    humaneval_like = {"prompt": 'def inc(x):\n    """Add one.\n    >>> inc(1)\n    2\n    """\n', "entry_point": "inc"}
    assert public_tests(humaneval_like) == ["assert (inc(1)) == (2)"]
    assert public_tests({"prompt": "Write inc.", "entry_point": "inc"}) == []


def test_run_job_writes_pass_at_k_and_resumes(compose, sandbox, tmp_path):
    from qsteer.run import run_job

    cfg = compose("workflow=repeated_sampling", "workflow.n=4", "dataset=basic_code", "dataset.limit=2")
    policy = ScriptedPolicy(reply)
    summary = run_job(cfg, tmp_path, roles={"policy": policy, "sandbox": sandbox})
    # each problem: 4 candidates, the 1st and 3rd right; the wrong ones fail the public example too
    assert summary["metrics"]["pass_at_k"] == [0.5, round(1 - 1 / 6, 4), 1.0, 1.0]
    assert summary["metrics"]["pass_at_k_public_filtered"] == [1.0] * 4
    assert summary["mean_reward"] == 1.0 and summary["metrics"]["sandbox_faults"] == 0
    assert len(list((tmp_path / "stages").glob("*.json"))) == 2
    again = ScriptedPolicy(reply)
    assert run_job(cfg, tmp_path, roles={"policy": again, "sandbox": sandbox})["metrics"]["pass_at_k"][0] == 0.5
    assert again.calls == []


@pytest.mark.ray
def test_a_code_workflow_runs_on_ray_actors(ray_session, compose, tiny_path, tmp_path):
    """The orchestrator builds the policy and the sandbox pool as Ray actors for a code workflow."""
    from qsteer.run import run_job

    cfg = compose("workflow=ideasearch", "workflow.n=2", f"model.path={tiny_path}", "dataset=basic_code", "dataset.limit=2",
                  "generation.max_new_tokens=6", "sandbox.replicas=2")
    summary = run_job(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert summary["num_errors"] == 0 and len(summary["metrics"]["pass_at_k"]) == 2
    for row in rows:  # the tiny model writes no program: every candidate is judged and fails
        assert len(row["candidates"]) == 2 and not any(c["passed"] for c in row["candidates"])
        assert set(row["stages"]) == {"sketch", "code"} and len(row["stages"]["sketch"]) == 2
        assert row["stats"]["generated_tokens"] == sum(row["stats"]["tokens_by_stage"].values())
