"""Prompts of PlanSearch and its baselines (repeated sampling, IdeaSearch), kept as data.

Written for qsteer after the structure of the reference implementation (scaleapi/plansearch,
`search/prompts/`): the same conversations, turns and slots, in our own words. Every prompt
is a chat: a system message that sets the role, then one user message; some stages continue
the same conversation with follow-up user turns. The stages, in order:

1. first-order observations: the problem, asking for `n_obs` creative, non-obvious hints,
   each preceded by its reasoning, and no code;
2. the three follow-up turns that turn free text into a list (`LIST_FOLLOW_UPS`): restate the
   observations only, keep the most useful, write them as a Python list of strings in a
   ```python block (the reply is parsed by `plansearch_parse`, never evaluated);
3. second-order observations: the problem and a subset of observations (none, one, or
   several, each phrased differently), asking to quote the statement, reason about the
   implications, then combine them into new observations, in a fixed markdown skeleton;
   then the same three follow-ups;
4. a natural-language sketch from an observation tuple (quote the observations used);
5. the critique (a coach's criticism of the sketch and a small failing input), continued by
   `FIX_FOLLOW_UP` (how to fix it, no code): the original and the fixed sketch both go on;
6. pseudocode that follows a sketch exactly;
7. code from the pseudocode, after two worked examples (function-style when the problem has
   starter code, standard input/output otherwise); the reply's first code block is the code.

Ablations: `code_from_sketch` (no pseudocode; also IdeaSearch's code step) and
`code_from_observations` (no sketch). Baselines: `repeated_sampling` (code directly, two
worked examples) and `idea_sketch` (IdeaSearch's sketch, after two worked sketches).

The judge of idea-level diversity (the reference's `search/scripts/check_similar.py`):
`idea_summary` back-translates a program into the idea behind it, and `same_idea` shows two
programs with their ideas and asks for "Yes." or "No." (parsed by `metrics.idea_diversity`).

The worked examples are short problems written for qsteer, so that a small model's context
holds them: the reference's are LiveCodeBench problems of a few hundred tokens each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qsteer.data import prompt_text

__all__ = [
    "FIX_FOLLOW_UP",
    "LIST_FOLLOW_UPS",
    "Conversation",
    "Problem",
    "code_from_observations",
    "code_from_pseudocode",
    "code_from_sketch",
    "critique",
    "first_observations",
    "follow_up",
    "idea_sketch",
    "idea_summary",
    "problem_of",
    "pseudocode",
    "repeated_sampling",
    "same_idea",
    "second_observations",
    "sketch",
]

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Problem:
    """What every prompt shows: the statement, and the code the answer must start from."""

    statement: str
    """The problem as the model reads it (for HumanEval-format sets: signature and docstring)."""
    starter_code: str = ""
    """Code the solution must complete; empty for a standard input/output problem."""


def problem_of(record: dict[str, Any]) -> Problem:
    """The problem of a dataset record: a HumanEval-format record's code is statement and starter code."""
    code = record.get("prompt_code")
    if code is None and "entry_point" in record and "prompt" in record:
        code = record["prompt"]
    if code is not None:
        return Problem(statement=code, starter_code=code)
    return Problem(statement=prompt_text(record))


def _chat(system: str, user: str) -> Conversation:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def follow_up(conversation: Conversation, reply: str, question: str) -> Conversation:
    """The conversation continued by the model's `reply` and the next user turn."""
    return [*conversation, {"role": "assistant", "content": reply}, {"role": "user", "content": question}]


def _observation_bullets(observations: Sequence[str]) -> str:
    return "\n".join(f"- {observation}" for observation in observations)


# --- 1. first-order observations -------------------------------------------------------------

OBSERVER_SYSTEM = (
    "You are a skilled Python programmer. You will read a programming problem and point out "
    "correct, useful observations about it that are not obvious: hints that help a solver. "
    "Think beyond your first intuition. Do not write any code."
)


def first_observations(problem: Problem, n_obs: int) -> Conversation:
    """Ask for `n_obs` short, creative observations, each after a paragraph of reasoning."""
    user = (
        f"The programming problem:\n\n{problem.statement}\n\n"
        f"Come up with {n_obs} observations about properties of this problem that are not obvious. "
        "Keep each observation to a few words, and prefer unusual angles you would not normally "
        "consider.\n\n"
        "Reason before every observation, in this form:\n\n"
        "Observation 1:\n"
        "a short paragraph of reasoning\n"
        '"the observation" (for instance "sorting first makes this a single pass" or '
        '"a dictionary of counts answers each query")\n\n'
        "Each observation should help solve the problem, not restate it."
    )
    return _chat(OBSERVER_SYSTEM, user)


# --- 2. the follow-ups that turn observations into a list ------------------------------------

LIST_ALL = "Now list the observations only, with nothing else."
KEEP_USEFUL = "Keep only the most useful of these observations."
AS_PYTHON_LIST = (
    "Write these observations as a Python list of strings. For example, the observations\n\n"
    "1. Count each character once.\n"
    "2. An empty input is a special case.\n\n"
    "become\n\n"
    "```python\n"
    '["Count each character once.", "An empty input is a special case."]\n'
    "```\n\n"
    "Reply with the Python list only."
)
LIST_FOLLOW_UPS: tuple[str, str, str] = (LIST_ALL, KEEP_USEFUL, AS_PYTHON_LIST)
"""The follow-up user turns, in order, after an observation prompt; the last one's reply is parsed."""


# --- 3. second-order observations ------------------------------------------------------------

COMBINER_SYSTEM = (
    "You are a skilled Python programmer. You will read a programming problem together with "
    "some correct observations about it, and derive new, useful, correct observations from "
    "them. Think beyond your first intuition. Do not write any code."
)


def second_observations(problem: Problem, observations: Sequence[str]) -> Conversation:
    """Ask to combine an observation subset (possibly empty) into new observations, in a fixed skeleton."""
    several, some = len(observations) >= 2, len(observations) >= 1
    if several:
        given = "These observations about the problem are correct and will help:\n" + _observation_bullets(
            observations
        )
    elif some:
        given = "This observation about the problem is correct and will help:\n" + _observation_bullets(observations)
    else:
        given = "The problem can be solved without any given observation."
    basis = "the observations" if some else "the problem"
    action = "combine the observations" if several else "build on the implications"
    user = (
        f"The programming problem:\n\n{problem.statement}\n\n{given}\n\n"
        f"First think about what {basis} above imply, quoting the most important parts of the "
        "problem statement.\n\n"
        f"Then {action} to come up with new observations that are not obvious. Before each new "
        "observation, quote word for word the implications it comes from.\n\n"
        "Use roughly this layout:\n\n"
        "## Implications:\n\n"
        "[quotes of the key parts of the problem statement]\n\n"
        + ("[quotes of the observations]\n\n" if some else "")
        + "### Reasoned Implications:\n\n"
        "[your step-by-step implications, citing the quotes above]\n\n"
        "## New Observations:\n\n"
        "### Observation 1:\n\n"
        "[quotes from the Reasoned Implications]\n\n"
        "[a short paragraph of step-by-step reasoning]\n\n"
        "[the new observation]\n\n"
        "### Observation 2:\n\n"
        "...\n\n"
        "The new observations should be creative and useful, follow from the implications"
        + (" of the given observations" if some else "")
        + ", and not restate the obvious."
    )
    return _chat(COMBINER_SYSTEM, user)


# --- 4. natural-language sketch --------------------------------------------------------------

SKETCH_SYSTEM = (
    "You are a skilled Python programmer. You will read a programming problem and some "
    "observations needed to solve it, and describe a solution in plain language, like an "
    "editorial, that uses those observations. Do not write any code. Be creative and look "
    "beyond your first intuition."
)


def sketch(problem: Problem, observations: Sequence[str]) -> Conversation:
    """Ask for a plain-language solution built on an observation tuple (possibly empty)."""
    if observations:
        given = "Observations that help solve it:\n\n" + _observation_bullets(observations)
    else:
        given = "The problem can be solved without any given observation."
    user = (
        f"The programming problem:\n\n{problem.statement}\n\n{given}\n\n"
        "Using the observations above, describe a solution to the problem in plain language. "
        "Your first idea may be wrong, so consider simple but unusual approaches. Before each "
        "step of the solution, quote word for word the observation it relies on; the quotes matter."
    )
    return _chat(SKETCH_SYSTEM, user)


# --- 5. critique and fix ---------------------------------------------------------------------

COACH_SYSTEM = (
    "You are a skilled Python programmer who coaches students for programming contests. You "
    "will read a problem and a student's idea for solving it, then criticise the idea and give "
    "a small input on which it fails. Never write solution code."
)
FIX_FOLLOW_UP = "Given your criticism, how would you fix the idea? Do not write any code."
"""The user turn after the critique; its reply is the fixed sketch."""


def critique(problem: Problem, proposed_sketch: str) -> Conversation:
    """Ask a coach to criticise a sketch and give a counter-example input."""
    user = (
        f"The programming problem:\n\n{problem.statement}\n\n"
        f"A student proposes this solution:\n\n{proposed_sketch}\n\n"
        "The proposal may be wrong. Criticise it: a contest solution has to be exactly right, "
        "while practical concerns outside the problem statement do not matter.\n\n"
        "Also give an input (a counter-example) on which the proposal fails."
    )
    return _chat(COACH_SYSTEM, user)


# --- 6. pseudocode ---------------------------------------------------------------------------

PSEUDOCODE_SYSTEM = (
    "You are a skilled Python programmer. You will read a problem and a plain-language "
    "solution for it, and write correct pseudocode that follows that solution exactly. Do not "
    "put the pseudocode in a Markdown code block."
)


def pseudocode(problem: Problem, solution_sketch: str) -> Conversation:
    """Ask for high-level pseudocode that follows a sketch exactly."""
    user = (
        f"The programming problem:\n\n{problem.statement}\n\n"
        f"A plain-language solution:\n\n{solution_sketch}\n\n"
        "Write pseudocode that follows this solution exactly and solves the problem. Keep it "
        "high-level; low-level details are not needed."
    )
    return _chat(PSEUDOCODE_SYSTEM, user)


# --- 7. code, and the worked examples it follows ---------------------------------------------

FUNCTION_EXAMPLES: tuple[dict[str, str], ...] = (
    {
        "problem": 'def count_pairs(numbers: list, target: int) -> int:\n    """Return how many pairs i < j '
        'have numbers[i] + numbers[j] == target."""\n',
        "sketch": "Remember how often each value has been seen so far. For each number, the pairs it "
        "closes are the earlier numbers equal to target minus it; add that count, then record the number.",
        "code": "def count_pairs(numbers: list, target: int) -> int:\n    seen = {}\n    pairs = 0\n"
        "    for x in numbers:\n        pairs += seen.get(target - x, 0)\n        seen[x] = seen.get(x, 0) + 1\n"
        "    return pairs",
    },
    {
        "problem": 'def longest_run(s: str) -> int:\n    """Return the length of the longest block of equal '
        'adjacent characters in s (0 for an empty string)."""\n',
        "sketch": "Walk through the string keeping the length of the current block: it grows when a "
        "character equals the previous one and restarts at 1 otherwise. The answer is the largest length seen.",
        "code": "def longest_run(s: str) -> int:\n    best = current = 0\n    for i, c in enumerate(s):\n"
        "        current = current + 1 if i and c == s[i - 1] else 1\n        best = max(best, current)\n"
        "    return best",
    },
)
"""Worked examples for problems with starter code."""

STDIO_EXAMPLES: tuple[dict[str, str], ...] = (
    {
        "problem": "The first line holds n, the second n integers. Print the largest minus the smallest.",
        "sketch": "Read the numbers and print the difference between their maximum and their minimum.",
        "code": "n = int(input())\nnumbers = list(map(int, input().split()))\nprint(max(numbers) - min(numbers))",
    },
    {
        "problem": "Read a word and print YES if it reads the same backwards, NO otherwise.",
        "sketch": "Compare the word with its reverse and print the verdict.",
        "code": "word = input().strip()\nprint('YES' if word == word[::-1] else 'NO')",
    },
)
"""Worked examples for standard input/output problems."""

CODER_SYSTEM = (
    "You are a skilled Python programmer. You will read a problem and a plan for solving it, and "
    "write a correct Python program that follows the plan and passes all tests. Reply with the "
    "program in a Markdown code block and nothing else."
)


def _examples(problem: Problem) -> str:
    # As in the reference, the code prompts' examples show problem and program, not the plan.
    text = ""
    for example in FUNCTION_EXAMPLES if problem.starter_code else STDIO_EXAMPLES:
        text += f"Example problem:\n\n{example['problem']}\n\n"
        text += f"Example program:\n\n```python\n{example['code']}\n```\n\n\n"
    return text


def _code_request(problem: Problem, plan_name: str, plan: str, examples: str) -> str:
    text = (
        f"You will be given a programming problem and its {plan_name}; write correct Python code that "
        f"follows the {plan_name} and solves the problem."
        + (f" Examples:\n\n\n{examples}" if examples else "\n\n")
        + f"The programming problem:\n\n{problem.statement}\n\n"
        f"The {plan_name}:\n\n{plan}\n\n"
        f"Write a Python program that follows the {plan_name} and solves the problem."
    )
    return text + _starter_note(problem)


def _starter_note(problem: Problem) -> str:
    if problem.starter_code:
        return f"\n\nStart your solution from this code:\n\n```python\n{problem.starter_code.rstrip()}\n```"
    return "\n\nRead from standard input and write to standard output; the program runs as it is."


def code_from_pseudocode(problem: Problem, pseudocode_text: str) -> Conversation:
    """Ask for a program that follows the pseudocode, after two worked examples."""
    user = _code_request(problem, "pseudocode", pseudocode_text, _examples(problem))
    return _chat(CODER_SYSTEM, user)


def code_from_sketch(problem: Problem, solution_sketch: str) -> Conversation:
    """Ask for a program that follows a plain-language sketch (without_pseudocode; IdeaSearch's code step)."""
    user = _code_request(problem, "solution sketch", solution_sketch, _examples(problem))
    return _chat(CODER_SYSTEM, user)


def code_from_observations(problem: Problem, observations: Sequence[str]) -> Conversation:
    """Ask for a program that uses an observation tuple directly (without_idea)."""
    plan = _observation_bullets(observations) if observations else "No observation is needed."
    return _chat(CODER_SYSTEM, _code_request(problem, "observations", plan, ""))


# --- baselines -------------------------------------------------------------------------------

DIRECT_SYSTEM = (
    "You are a skilled Python programmer. You will read a problem and write a correct Python "
    "program that meets it and passes all tests. Reply with the program in a Markdown code "
    "block and nothing else."
)


def repeated_sampling(problem: Problem) -> Conversation:
    """Repeated sampling's prompt: two worked examples, then the problem; code directly."""
    user = (
        f"Examples:\n\n\n{_examples(problem)}"
        f"Following the examples above, write a program that solves this problem:\n\n{problem.statement}"
        + _starter_note(problem)
    )
    return _chat(DIRECT_SYSTEM, user)


IDEA_SYSTEM = (
    "You are a skilled Python programmer. You will read a programming problem and describe a "
    "solution in plain language, like an editorial. Do not write any code. Be creative and "
    "look beyond your first intuition."
)


def idea_sketch(problem: Problem) -> Conversation:
    """IdeaSearch's first step: a plain-language sketch after two worked sketches."""
    examples = ""
    for example in FUNCTION_EXAMPLES if problem.starter_code else STDIO_EXAMPLES:
        examples += f"Example problem:\n\n{example['problem']}\n\nExample solution:\n\n{example['sketch']}\n\n\n"
    user = (
        "You will be given a programming problem; describe at a high level, in plain language, how "
        f"to solve it. Examples:\n\n\n{examples}"
        f"The programming problem:\n\n{problem.statement}\n\n"
        "Describe a solution to the problem above in plain language. Your first idea may be wrong, "
        "so consider simple but unusual approaches beyond your usual ones; that matters most."
    )
    return _chat(IDEA_SYSTEM, user)


# --- the diversity judge (idea-level diversity, not a search stage) ---------------------------

IDEA_SUMMARY_SYSTEM = (
    "You are a skilled Python programmer. You will read a programming problem and a program "
    "written for it, and explain in plain language, like an editorial, how the program works "
    "and the idea it is built on. Do not write any code."
)


def idea_summary(problem: Problem, code: str) -> Conversation:
    """Back-translation: ask for the idea behind one candidate program, in plain language."""
    user = (
        f"The programming problem:\n\n{problem.statement}\n\n"
        f"A program written to solve it:\n\n```python\n{code}\n```\n\n"
        "Explain at a high level, in plain language, how this program works and the idea behind it."
    )
    return _chat(IDEA_SUMMARY_SYSTEM, user)


SAME_IDEA_SYSTEM = (
    "You are a skilled Python programmer. You will read a programming problem and two programs "
    "that try to solve it, each followed by a plain-language account of its idea, and say whether "
    "the two programs are built on the same idea. Answer with 'Yes.' or 'No.' and nothing else."
)


def same_idea(problem: Problem, code_a: str, idea_a: str, code_b: str, idea_b: str) -> Conversation:
    """Ask whether two candidates (each with its back-translated idea) share the same idea."""
    user = (
        f"The programming problem:\n\n{problem.statement}\n\n"
        f"The first program, then its idea:\n\n```python\n{code_a}\n```\n\n{idea_a}\n\n"
        f"The second program, then its idea:\n\n```python\n{code_b}\n```\n\n{idea_b}\n\n"
        "Going by the two accounts of their ideas, do the programs share the same idea? "
        "Answer 'Yes.' or 'No.' only."
    )
    return _chat(SAME_IDEA_SYSTEM, user)
