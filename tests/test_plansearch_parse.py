"""PlanSearch bookkeeping with a scripted policy (fixed replies): list turns, parse retries and
fallbacks, the observation tree and the codes drawn from it, against the reference's rules."""

from __future__ import annotations

import json
import random
from itertools import combinations
from math import comb

import pytest

from qsteer.workflows import plansearch_prompts as prompts
from qsteer.workflows.plansearch_parse import (
    PARSE_TEMPERATURES,
    CodeSlot,
    ObservationTree,
    ask_for_observations,
    draw_code_slots,
    first_code_block,
    grow_observation_trees,
    observation_subsets,
    parse_string_list,
    sketch_jobs,
)

PROBLEM = prompts.Problem(statement="Read two integers and print their sum.")
OTHER = prompts.Problem(statement="Read a word and print it backwards.")


def fenced(items) -> str:
    return f"Here you go:\n```python\n{json.dumps(items)}\n```\n"


def given_observations(conversation) -> tuple[str, ...]:
    """The subset a second-order prompt shows, read back from its bullets."""
    text = conversation[1]["content"].split("First think")[0]
    return tuple(line[2:] for line in text.splitlines() if line.startswith("- "))


class ScriptedPolicy:
    """Fixed replies: prose for every turn but the list turn, which gets `lists(conversation)`
    (None => a reply that does not parse) once `tries_needed(conversation)` tries were made."""

    def __init__(self, lists, tries_needed=lambda conversation: 1):
        self.lists, self.tries_needed = lists, tries_needed
        self.calls: list[tuple[list, float | None]] = []
        self.tries: dict[str, int] = {}

    def __call__(self, conversations, temperature):
        self.calls.append((conversations, temperature))
        return [self.reply(conversation) for conversation in conversations]

    def reply(self, conversation):
        if conversation[-1]["content"] != prompts.AS_PYTHON_LIST:
            return f"prose #{len(conversation)} for {conversation[1]['content'][-40:]!r}"
        key = json.dumps(conversation)
        self.tries[key] = self.tries.get(key, 0) + 1
        items = self.lists(conversation)
        if items is None or self.tries[key] < self.tries_needed(conversation):
            return "Sorry, here they are: 1. first 2. second"
        return fenced(items)


def tree_lists(n1=3, n2=lambda given: len(given) + 1):
    """Root: n1 observations; a layer-1 node given subset g: n2(g) new ones, distinct across nodes."""

    def lists(conversation):
        if conversation[0]["content"] == prompts.OBSERVER_SYSTEM:
            return [f"root{i}" for i in range(n1)]
        given = given_observations(conversation)
        return [f"{'&'.join(given) or 'none'}/new{j}" for j in range(n2(given))]

    return lists


def test_observation_turns_continue_one_conversation_in_the_reference_order():
    policy = ScriptedPolicy(lambda conversation: ["a", "b"])
    start = prompts.first_observations(PROBLEM, 10)
    [reply] = ask_for_observations([start], policy)
    assert reply.observations == ("a", "b") and reply.log["parsed"]
    assert [len(conversations) for conversations, _ in policy.calls] == [1, 1, 1, 1]
    assert [temperature for _, temperature in policy.calls] == [None, None, None, 0.0]
    final = policy.calls[-1][0][0]
    assert [m["role"] for m in final] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert final[:2] == start
    assert tuple(m["content"] for m in final[3::2]) == prompts.LIST_FOLLOW_UPS
    # each assistant turn is the reply to the call before it
    for index, (conversations, _) in enumerate(policy.calls[1:]):
        assert conversations[0][-2]["content"] == policy.reply(policy.calls[index][0][0])
    assert reply.log["observations_text"] == final[2]["content"]
    assert reply.log["listed"] == final[4]["content"] and reply.log["filtered"] == final[6]["content"]


def test_parse_retries_ask_again_only_failed_lists_at_temperatures_0_02_04():
    starts = [prompts.first_observations(p, 3) for p in (PROBLEM, OTHER, prompts.Problem("Print 42."))]
    tries = {starts[0][1]["content"]: 1, starts[1][1]["content"]: 2, starts[2][1]["content"]: 99}
    policy = ScriptedPolicy(lambda c: ["x"], tries_needed=lambda c: tries[c[1]["content"]])
    replies = ask_for_observations(starts, policy)
    assert PARSE_TEMPERATURES == (0.0, 0.2, 0.4)
    list_calls = policy.calls[3:]
    assert [(len(c), t) for c, t in list_calls] == [(3, 0.0), (2, 0.2), (1, 0.4)]
    assert [r.observations for r in replies] == [("x",), ("x",), ()]
    assert [len(r.log["list_attempts"]) for r in replies] == [1, 2, 3]
    assert [r.log["parsed"] for r in replies] == [True, True, False]


def test_no_retry_when_every_list_parses():
    policy = ScriptedPolicy(lambda c: [])
    [reply] = ask_for_observations([prompts.first_observations(PROBLEM, 3)], policy)
    assert reply.observations == () and reply.log["parsed"]  # an empty list is a parsed list
    assert len(policy.calls) == 4


@pytest.mark.parametrize(
    "reply",
    [
        "1. first\n2. second",  # prose, no fence
        '["a", "b"]',  # a bare list: the reference only reads a fenced block
        "```python\n[1, 2]\n```",  # not strings
        '```python\n{"a": 1}\n```',  # not a list
        '```python\n("a", "b")\n```',  # a tuple is not a list
        '```python\n["a" + "b"]\n```',  # an expression: eval would accept it
        '```python\n[x for x in "ab"]\n```',
        '```python\n["a", "b"\n```',  # unbalanced
        "```python\n```",  # empty block
    ],
)
def test_unparseable_lists_give_none(reply):
    assert parse_string_list(reply) is None


def test_lists_are_read_as_literals_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    hostile = f"```python\n[open({str(marker)!r}, 'w').write('x') and 'a']\n```"
    assert parse_string_list(hostile) is None
    assert not marker.exists()


def test_first_block_rule_of_the_reference():
    assert first_code_block("intro\n```py\n['a']\n```\n```python\n['b']\n```") == "['a']\n"
    assert first_code_block("```\nline 1\nline 2") == "line 1\nline 2\n"  # unclosed: to the end
    assert first_code_block("no fence") == ""
    assert parse_string_list("text\n```python\n[\n  'a',\n  \"b\",\n]\n```\nmore") == ["a", "b"]


def test_subsets_are_all_sizes_up_to_max_k_shuffled_by_the_seed():
    observations = ("a", "b", "c", "d")
    subsets = observation_subsets(observations, 2, random.Random(3))
    expected = [s for k in range(3) for s in combinations(observations, k)]
    assert sorted(subsets) == sorted(expected) and len(subsets) == 1 + 4 + 6
    assert subsets == observation_subsets(observations, 2, random.Random(3))
    assert subsets != expected  # shuffled (for this seed)
    assert sorted(observation_subsets(("a",), 2, random.Random(0))) == [(), ("a",)]
    assert observation_subsets((), 2, random.Random(0)) == [()]


def test_tree_grows_as_the_reference_and_counts_unique_tuples():
    policy = ScriptedPolicy(tree_lists(n1=3))
    trees = [ObservationTree(random.Random(3)), ObservationTree(random.Random(4))]
    grow_observation_trees([PROBLEM, OTHER], trees, policy, layers=2, n_obs=10)
    n1 = 3
    layer1 = 1 + n1 + comb(n1, 2)
    # one batched call per turn across both problems: 4 for the roots, 4 for all layer-1 nodes
    assert [len(c) for c, _ in policy.calls] == [2, 2, 2, 2, 2 * layer1, 2 * layer1, 2 * layer1, 2 * layer1]
    assert sum(len(c) for c, _ in policy.calls) == 2 * 4 * (2 + n1 + comb(n1, 2))  # the notes' call count
    for tree in trees:
        root = tree.root
        assert root.derived == ("root0", "root1", "root2")
        assert sorted(child.given for child in root.children) == sorted(
            s for k in range(3) for s in combinations(root.derived, k)
        )
        n2s = []
        for child in root.children:
            # each layer-1 prompt shows its own subset; its children come from its new observations only
            expected = tuple(f"{'&'.join(child.given) or 'none'}/new{j}" for j in range(len(child.given) + 1))
            assert child.layer == 1 and child.derived == expected
            assert {o for grandchild in child.children for o in grandchild.given} <= set(child.derived)
            assert len(child.children) == 1 + len(child.derived) + comb(len(child.derived), 2)
            n2s.append(len(child.derived))
        tuples = tree.unique_tuples()
        assert len(tuples) == len(set(tuples)) == 1 + (n1 + comb(n1, 2)) + sum(n + comb(n, 2) for n in n2s)
        # children before parent, first seen first: the walk starts at the first layer-1 node's first child
        assert tuples[0] == root.children[0].children[0].given
        assert all(node.layer == 2 for node in tree.frontier())
    # the layer-1 batch holds the first problem's nodes, then the second's, each with its own subset
    layer1_batch = policy.calls[4][0]
    expected = [prompts.second_observations(p, node.given) for p, t in ((PROBLEM, trees[0]), (OTHER, trees[1])) for node in t.root.children]
    assert layer1_batch == expected


def test_repeated_observations_are_counted_once():
    # every layer-1 node derives the same two observations: their subsets are shared
    policy = ScriptedPolicy(lambda c: ["r0", "r1"] if c[0]["content"] == prompts.OBSERVER_SYSTEM else ["x", "y"])
    tree = ObservationTree(random.Random(3))
    grow_observation_trees([PROBLEM], [tree], policy, layers=2)
    assert len(tree.root.children) == 4
    assert sorted(tree.unique_tuples()) == sorted([(), ("r0",), ("r1",), ("r0", "r1"), ("x",), ("y",), ("x", "y")])


def test_unparsed_lists_degrade_to_the_empty_tuple():
    policy = ScriptedPolicy(lambda c: None)
    tree = ObservationTree(random.Random(3))
    grow_observation_trees([PROBLEM], [tree], policy, layers=2)
    assert tree.root.derived == () and [c.given for c in tree.root.children] == [()]
    assert tree.unique_tuples() == [()]
    # 4 + 2 retries for the root, the same for its single (empty-subset) child
    assert len(policy.calls) == 12
    slots = draw_code_slots(tree.unique_tuples(), 2, use_fix=True, rng=random.Random(0))
    assert sorted(slot.sketch for slot in slots) == ["fixed", "original"]


def test_growing_again_only_expands_missing_nodes():
    policy = ScriptedPolicy(tree_lists(n1=2))
    tree = ObservationTree(random.Random(3))
    grow_observation_trees([PROBLEM], [tree], policy, layers=1)
    calls = len(policy.calls)
    grow_observation_trees([PROBLEM], [tree], policy, layers=2)
    assert len(policy.calls) == calls + 4  # only layer 1 was asked
    with pytest.raises(ValueError, match="already expanded"):
        tree.expand(tree.root, ["again"])


def test_code_slots_take_every_tuple_twice_when_n_is_the_whole_tree():
    tuples = [(), ("a",), ("b",), ("a", "b")]
    slots = draw_code_slots(tuples, 8, use_fix=True, rng=random.Random(3))
    assert sorted((s.observations, s.sketch) for s in slots) == sorted(
        (t, sketch) for t in tuples for sketch in ("original", "fixed")
    )
    assert {s.round for s in slots} == {0}
    jobs = sketch_jobs(slots)
    assert sorted(job.observations for job in jobs) == sorted(tuples) and all(job.fix for job in jobs)
    # without the fix step: one code per tuple, no critique
    plain = draw_code_slots(tuples, 4, use_fix=False, rng=random.Random(3))
    assert sorted(s.observations for s in plain) == sorted(tuples) and {s.sketch for s in plain} == {"original"}
    assert not any(job.fix for job in sketch_jobs(plain))


def test_code_slots_draw_n_and_go_round_again_past_the_tree():
    tuples = [(), ("a",), ("b",)]
    few = draw_code_slots(tuples, 4, use_fix=True, rng=random.Random(5))
    assert len(few) == len(set(few)) == 4
    assert few == draw_code_slots(tuples, 4, use_fix=True, rng=random.Random(5))
    assert few == draw_code_slots(tuples, 6, use_fix=True, rng=random.Random(5))[:4]  # a prefix of the full draw
    # a fix only where a fixed sketch was drawn; every drawn tuple gets its sketch once per round
    for job in sketch_jobs(few):
        assert job.fix == any(s.observations == job.observations and s.sketch == "fixed" for s in few)
    many = draw_code_slots(tuples, 14, use_fix=True, rng=random.Random(5))
    assert [s.round for s in many] == [0] * 6 + [1] * 6 + [2] * 2
    assert many[6:12] == [CodeSlot(s.observations, 1, s.sketch) for s in many[:6]]
    assert len(sketch_jobs(many)) == 3 + 3 + len({s.observations for s in many[12:]})


def test_the_per_tuple_stage_counts_match_the_notes():
    # With n = 2 x #tuples every tuple costs 7 calls: sketch, critique, fix, 2 pseudocode, 2 code.
    policy = ScriptedPolicy(tree_lists(n1=2))
    tree = ObservationTree(random.Random(3))
    grow_observation_trees([PROBLEM], [tree], policy, layers=2)
    tuples = tree.unique_tuples()
    slots = draw_code_slots(tuples, 2 * len(tuples), use_fix=True, rng=random.Random(3))
    jobs = sketch_jobs(slots)
    calls = len(jobs) + 2 * sum(job.fix for job in jobs) + 2 * len(slots)
    assert calls == 7 * len(tuples)


def test_bad_draws_are_named():
    with pytest.raises(ValueError, match="n must be >= 1"):
        draw_code_slots([()], 0, use_fix=True, rng=random.Random(0))
    with pytest.raises(ValueError, match="no tuple"):
        draw_code_slots([], 3, use_fix=True, rng=random.Random(0))
    with pytest.raises(ValueError, match="2 problems but 1 trees"):
        grow_observation_trees([PROBLEM, OTHER], [ObservationTree(random.Random(0))], ScriptedPolicy(lambda c: []))
