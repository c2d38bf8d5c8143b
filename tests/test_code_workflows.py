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
import re
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


def code_blocks(conversation: list[dict]) -> list[str]:
    return re.findall(r"```python\n(.*?)```", conversation[-1]["content"], re.DOTALL)


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
    if stage == "summarize":  # the idea names the program, so equal programs have equal ideas
        return "IDEA: " + " ".join(code_blocks(conversation)[-1].split())
    if stage == "same_idea":  # a judge that calls two programs the same idea when they are equal
        first, second = code_blocks(conversation)[-2:]
        return "Yes." if first == second else "No."
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
    def _run(records, *overrides, store=None, replies=reply):
        cfg = compose(*overrides, "generation.temperature=0.8")
        policy = ScriptedPolicy(replies)
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

    cfg = compose("workflow=repeated_sampling", "workflow.n=4", "dataset=basic_code", "dataset.limit=2",
                  "workflow.vendi=false")  # the Vendi score's embedding model is for the tests marked model
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


# -- idea-level diversity (metrics.idea_diversity): the policy as judge ---------------------------------------

def judge_calls(policy: ScriptedPolicy) -> list:
    return [call for call in policy.calls if stage_of(call.conversations[0]) in ("summarize", "same_idea")]


def test_idea_judge_back_translates_then_judges_every_pair_in_two_batched_calls(run, records):
    plain, plain_policy = run(records, "workflow=repeated_sampling", "workflow.n=4")
    rows, policy = run(records, "workflow=repeated_sampling", "workflow.n=4", "workflow.idea_diversity=true")
    assert policy.stages() == [{"direct"}, {"summarize"}, {"same_idea"}]
    summarize, pairs = policy.calls[1:]
    assert len(summarize.conversations) == 2 * 4 and len(pairs.conversations) == 2 * comb(4, 2)
    assert summarize.temperature == pairs.temperature == 0.0
    assert pairs.max_new_tokens == 16 and summarize.max_new_tokens == plain_policy.calls[0].max_new_tokens
    assert roles(pairs.conversations[0]) == ["system", "user"]
    for row, before in zip(rows, plain, strict=True):
        # candidates 0 and 2 are one program, 1 and 3 another: 2 of the 6 pairs share an idea
        assert row["idea_similarity"] == {"codes": 4, "pairs": 6, "same": 2, "unclear": 0, "similarity": 2 / 6}
        assert sorted(map(sorted, row["stages"]["idea_pairs"])) == [[a, b] for a in range(4) for b in range(a + 1, 4)]
        assert sorted(row["stages"]["idea_codes"]) == [0, 1, 2, 3]
        # the judge's work is measurement: the method's tokens and calls are those of the plain run
        assert row["stats"]["generated_tokens"] == before["stats"]["generated_tokens"]
        assert row["stats"]["tokens_by_stage"] == before["stats"]["tokens_by_stage"] == {"code": row["stats"]["generated_tokens"]}
        assert row["stats"]["policy_calls"] == before["stats"]["policy_calls"]
        assert row["stats"]["judge_calls"] == 1.0  # 2 calls over the batch's 2 records
        judged = sum(len(r.split()) for r in row["stages"]["idea_summary"] + row["stages"]["same_idea"])
        assert row["stats"]["judge_tokens"] == judged  # the scripted policy's tokens are the reply's words
        assert row["candidates"] == before["candidates"]


def test_idea_judge_considers_a_seeded_shuffle_of_at_most_the_limit(run, records):
    rows, policy = run(records, "workflow=ideasearch", "workflow.n=4", "workflow.idea_diversity=true",
                       "workflow.idea_diversity_codes=3")
    assert policy.stages() == [{"idea"}, {"code"}, {"summarize"}, {"same_idea"}]
    assert len(policy.calls[2].conversations) == 2 * 3 and len(policy.calls[3].conversations) == 2 * 3
    for row in rows:
        # 3 of the programs R, W, R, W always hold exactly one equal pair
        assert row["idea_similarity"] == {"codes": 3, "pairs": 3, "same": 1, "unclear": 0, "similarity": 1 / 3}
    again, _ = run(records, "workflow=ideasearch", "workflow.n=4", "workflow.idea_diversity=true",
                   "workflow.idea_diversity_codes=3")
    # the same seed draws the same codes; each problem draws 3 distinct ones of its 4
    assert [r["stages"]["idea_codes"] for r in again] == [r["stages"]["idea_codes"] for r in rows]
    assert all(len(set(r["stages"]["idea_codes"])) == 3 and set(r["stages"]["idea_codes"]) <= {0, 1, 2, 3}
               for r in rows)


def test_idea_judge_leaves_out_empty_programs_and_counts_unclear_replies(run, records):
    def replies(conversation, temperature, key, sample):
        stage = stage_of(conversation)
        if stage == "direct" and sample == 3:
            return ""  # no program at all
        if stage == "same_idea":
            return "Perhaps, in part." if "reverse_string" in conversation[1]["content"] else "No, yes."
        return reply(conversation, temperature, key, sample)

    rows, policy = run(records, "workflow=repeated_sampling", "workflow.n=4", "workflow.idea_diversity=true",
                       replies=replies)
    assert len(policy.calls[1].conversations) == 2 * 3 and len(policy.calls[2].conversations) == 2 * 3
    by_entry = {record["entry_point"]: row["idea_similarity"] for record, row in zip(records, rows, strict=True)}
    # neither word: not the same idea, counted as unclear; "No, yes." is read by its first answer
    assert by_entry["reverse_string"] == {"codes": 4, "pairs": 3, "same": 0, "unclear": 3, "similarity": 0.0}
    assert by_entry["sum_of_evens"] == {"codes": 4, "pairs": 3, "same": 0, "unclear": 0, "similarity": 0.0}
    assert all(3 not in pair for r in rows for pair in r["stages"]["idea_pairs"])


@pytest.mark.parametrize(("answer", "diversity"), [("Yes.", 0.0), ("No.", 1.0)])
def test_idea_diversity_of_a_judge_that_always_agrees_or_never_does(compose, sandbox, tmp_path, answer, diversity):
    from qsteer.run import run_job

    def replies(conversation, temperature, key, sample):
        return answer if stage_of(conversation) == "same_idea" else reply(conversation, temperature, key, sample)

    cfg = compose("workflow=plansearch", "workflow.n=3", "workflow.num_observations=2", "workflow.layers=1",
                  "workflow.idea_diversity=true", "workflow.vendi=false", "dataset=basic_code", "dataset.limit=2")
    summary = run_job(cfg, tmp_path, roles={"policy": ScriptedPolicy(replies), "sandbox": sandbox})
    assert summary["metrics"]["idea_diversity"] == diversity
    assert summary["metrics"]["idea_judge"] == {"pairs": 6, "same": 6 if answer == "Yes." else 0, "unclear": 0}
    assert "vendi" not in summary["metrics"]


def test_idea_diversity_in_the_summary_and_resumed_without_judging_again(compose, sandbox, tmp_path):
    from qsteer.run import run_job

    cfg = compose("workflow=repeated_sampling", "workflow.n=4", "workflow.idea_diversity=true", "workflow.vendi=false",
                  "dataset=basic_code", "dataset.limit=2")
    summary = run_job(cfg, tmp_path, roles={"policy": ScriptedPolicy(reply), "sandbox": sandbox})
    assert summary["metrics"]["idea_diversity"] == round(1 - 2 / 6, 4)
    assert summary["metrics"]["idea_judge"] == {"pairs": 12, "same": 4, "unclear": 0}
    # a run that died after the back-translations redoes the pair judgements only
    (tmp_path / "results.jsonl").unlink()
    store = StageStore(tmp_path / "stages")
    for record in load_dataset("basic_code", limit=2):
        state = store.load(record["id"])
        del state["same_idea"]
        store.save(record["id"], state)
    policy = ScriptedPolicy(reply)
    again = run_job(cfg, tmp_path, roles={"policy": policy, "sandbox": sandbox})
    assert policy.stages() == [{"same_idea"}] and len(policy.calls[0].conversations) == 12
    assert again["metrics"]["idea_diversity"] == summary["metrics"]["idea_diversity"]


@pytest.mark.model  # loads the Vendi score's embedding model (all-MiniLM-L6-v2), not the policy
@pytest.mark.parametrize("workflow", ["repeated_sampling", "ideasearch", "plansearch"])
def test_vendi_is_in_the_summary_of_every_plan_family_workflow(compose, sandbox, tmp_path, workflow):
    from qsteer.metrics.vendi import vendi_score
    from qsteer.run import run_job

    extra = ["workflow.num_observations=2", "workflow.layers=1"] if workflow == "plansearch" else []
    cfg = compose(f"workflow={workflow}", "workflow.n=4", *extra, "dataset=basic_code", "dataset.limit=2")
    summary = run_job(cfg, tmp_path, roles={"policy": ScriptedPolicy(reply), "sandbox": sandbox})
    # each problem's candidates are its right and its wrong program twice over; equal copies of each
    # item leave K / n's eigenvalues, hence the score, as those of the two programs alone
    expected = sum(vendi_score([RIGHT[name], WRONG[name]]) for name in RIGHT) / 2
    assert 1.0 < expected < 2.0
    assert summary["metrics"]["vendi"] == pytest.approx(expected, abs=1e-4)
