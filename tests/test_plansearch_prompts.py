"""PlanSearch prompts: every stage's conversation has the reference's structure and slots."""

from __future__ import annotations

import pytest

from qsteer.data import load_dataset
from qsteer.workflows import plansearch_prompts as prompts
from qsteer.workflows.plansearch_prompts import Problem

FUNCTION_PROBLEM = Problem(
    statement='def add(a: int, b: int) -> int:\n    """Return a + b.\n\n    >>> add(1, 2)\n    3\n    """\n',
    starter_code='def add(a: int, b: int) -> int:\n    """Return a + b.\n\n    >>> add(1, 2)\n    3\n    """\n',
)
STDIO_PROBLEM = Problem(statement="Read two integers and print their sum.")

BUILDERS = {
    "first_observations": lambda p: prompts.first_observations(p, 10),
    "second_observations": lambda p: prompts.second_observations(p, ("obs A", "obs B")),
    "sketch": lambda p: prompts.sketch(p, ("obs A",)),
    "critique": lambda p: prompts.critique(p, "SKETCH TEXT"),
    "pseudocode": lambda p: prompts.pseudocode(p, "SKETCH TEXT"),
    "code_from_pseudocode": lambda p: prompts.code_from_pseudocode(p, "PSEUDOCODE TEXT"),
    "code_from_sketch": lambda p: prompts.code_from_sketch(p, "SKETCH TEXT"),
    "code_from_observations": lambda p: prompts.code_from_observations(p, ("obs A",)),
    "repeated_sampling": prompts.repeated_sampling,
    "idea_sketch": prompts.idea_sketch,
}


@pytest.mark.parametrize("stage", sorted(BUILDERS))
@pytest.mark.parametrize("problem", [FUNCTION_PROBLEM, STDIO_PROBLEM], ids=["function", "stdio"])
def test_every_prompt_is_a_system_then_a_user_message_showing_the_problem(stage, problem):
    conversation = BUILDERS[stage](problem)
    assert [message["role"] for message in conversation] == ["system", "user"]
    assert all(isinstance(message["content"], str) and message["content"] for message in conversation)
    assert problem.statement in conversation[1]["content"]


def test_first_observations_asks_for_n_observations_without_code():
    conversation = prompts.first_observations(STDIO_PROBLEM, 7)
    assert "7 observations" in conversation[1]["content"]
    assert "Observation 1:" in conversation[1]["content"]
    assert "Do not write any code" in conversation[0]["content"]


def test_second_observations_phrases_none_one_and_several_observations_differently():
    none = prompts.second_observations(STDIO_PROBLEM, ())[1]["content"]
    one = prompts.second_observations(STDIO_PROBLEM, ("sum is commutative",))[1]["content"]
    two = prompts.second_observations(STDIO_PROBLEM, ("sum is commutative", "ints may be negative"))[1]["content"]
    assert "without any given observation" in none and "- " not in none.split("## Implications")[0]
    assert "This observation" in one and "- sum is commutative" in one
    assert "These observations" in two and "- sum is commutative\n- ints may be negative" in two
    assert "combine the observations" in two and "combine the observations" not in one
    # The skeleton the reference asks for, with the observation quotes only when there are some.
    for text in (none, one, two):
        for heading in ("## Implications:", "### Reasoned Implications:", "## New Observations:", "### Observation 1:"):
            assert heading in text
    assert "[quotes of the observations]" in one and "[quotes of the observations]" not in none


def test_list_follow_ups_are_list_filter_format_in_that_order():
    listed, kept, formatted = prompts.LIST_FOLLOW_UPS
    assert "list" in listed.lower() and "useful" in kept.lower()
    assert "Python list of strings" in formatted and "```python" in formatted
    conversation = prompts.follow_up(prompts.first_observations(STDIO_PROBLEM, 3), "REPLY", listed)
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user"]
    assert conversation[2]["content"] == "REPLY" and conversation[3]["content"] == listed


def test_sketch_quotes_each_observation_or_says_none_is_needed():
    text = prompts.sketch(STDIO_PROBLEM, ("obs A", "obs B"))[1]["content"]
    assert "- obs A\n- obs B" in text and "quote" in text
    assert "without any given observation" in prompts.sketch(STDIO_PROBLEM, ())[1]["content"]


def test_critique_then_fix_continues_the_same_conversation():
    conversation = prompts.critique(STDIO_PROBLEM, "SKETCH TEXT")
    assert "SKETCH TEXT" in conversation[1]["content"] and "counter-example" in conversation[1]["content"]
    fixed = prompts.follow_up(conversation, "CRITICISM", prompts.FIX_FOLLOW_UP)
    assert [m["role"] for m in fixed] == ["system", "user", "assistant", "user"]
    assert fixed[:2] == conversation and fixed[2]["content"] == "CRITICISM"
    assert "fix" in fixed[3]["content"] and "code" in fixed[3]["content"]


def test_code_prompts_show_the_plan_two_examples_and_the_starter_code():
    for problem, examples in ((FUNCTION_PROBLEM, prompts.FUNCTION_EXAMPLES), (STDIO_PROBLEM, prompts.STDIO_EXAMPLES)):
        for conversation, plan in (
            (prompts.code_from_pseudocode(problem, "PSEUDOCODE TEXT"), "PSEUDOCODE TEXT"),
            (prompts.code_from_sketch(problem, "SKETCH TEXT"), "SKETCH TEXT"),
        ):
            text = conversation[1]["content"]
            assert plan in text
            assert all(example["code"] in text for example in examples)
            assert text.count("```python") == len(examples) + bool(problem.starter_code)
            if problem.starter_code:
                assert text.endswith(f"```python\n{problem.starter_code.rstrip()}\n```")
            else:
                assert "standard input" in text
    direct = prompts.code_from_observations(STDIO_PROBLEM, ("obs A",))[1]["content"]
    assert "- obs A" in direct and "Example" not in direct


def test_baselines_show_worked_examples_then_the_problem():
    direct = prompts.repeated_sampling(FUNCTION_PROBLEM)[1]["content"]
    assert all(example["code"] in direct for example in prompts.FUNCTION_EXAMPLES)
    assert direct.index(prompts.FUNCTION_EXAMPLES[-1]["code"]) < direct.index(FUNCTION_PROBLEM.statement)
    idea = prompts.idea_sketch(STDIO_PROBLEM)[1]["content"]
    assert all(example["sketch"] in idea for example in prompts.STDIO_EXAMPLES)
    assert "```" not in idea  # a sketch prompt shows no code


def test_problem_of_a_humaneval_format_record_uses_its_code():
    record = load_dataset("basic_code", limit=1)[0]
    problem = prompts.problem_of(record)
    assert problem.statement == problem.starter_code == record["prompt_code"]
    plain = prompts.problem_of({"id": "1", "prompt": "Print hello."})
    assert plain == Problem(statement="Print hello.")
