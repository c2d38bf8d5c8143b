"""Best-of-N: sample N per prompt, score each, keep one.

`workflow.aggregate` picks how:
- `max`: the candidate with the highest reward (classic Best-of-N / rejection sampling);
- `weighted`: weighted Best-of-N (Li et al. 2023, "Making large language models better reasoners
  with step-aware verifier"): candidates vote for their extracted answer with their reward, the
  answer with the largest total wins;
- `majority`: self-consistency (Wang et al. 2022): the most frequent extracted answer wins.
Answers come from `workflow.answer_pattern` (a regex; its last match, group 1 if it has one),
by default the last `\\boxed{...}` or else the last number in the text.
"""

from __future__ import annotations

import re
from collections import defaultdict

from qsteer.workflows.common import Choice, Context, Stats, assemble, generate_and_score

AGGREGATES = ("max", "weighted", "majority")
_DEFAULT_PATTERNS = (r"\\boxed\{([^{}]*)\}", r"(-?\d[\d,]*(?:\.\d+)?)")


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    for regex in [pattern] if pattern else _DEFAULT_PATTERNS:
        matches = list(re.finditer(regex, text))
        if matches:
            last = matches[-1]
            answer = last.group(1) if last.groups() else last.group(0)
            return answer.strip().replace(",", "")
    return None


def select(rewards: list[float | None], answers: list[str | None], aggregate: str) -> int:
    """Index of the chosen candidate. Ties go to the earliest candidate, so n=1 is plain sampling."""
    values = [float("-inf") if r is None else r for r in rewards]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    if aggregate == "max" or all(a is None for a in answers):
        return best
    votes: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for answer, value in zip(answers, values, strict=True):
        if answer is not None:
            votes[answer] += 0.0 if value == float("-inf") else value
            counts[answer] += 1
    if aggregate == "weighted":
        winner = max(votes, key=lambda a: (votes[a], counts[a]))
    else:
        winner = max(counts, key=lambda a: (counts[a], votes[a]))
    members = [i for i, a in enumerate(answers) if a == winner]
    return max(members, key=lambda i: (values[i], -i))


def run(records: list[dict], ctx: Context) -> list[dict]:
    aggregate, pattern = ctx.workflow.aggregate, ctx.workflow.answer_pattern
    stats = Stats()
    completions, errors, scored = generate_and_score(records, ctx, ctx.workflow.n, stats)

    def choose(position: int, candidates: list[dict]) -> Choice:
        if aggregate == "max":
            chosen = select([c["reward"] for c in candidates], [None] * len(candidates), aggregate)
            return Choice(chosen, {"selected": chosen})
        for cand in candidates:
            cand["answer"] = extract_answer(cand["text"], pattern)
        chosen = select([c["reward"] for c in candidates], [c["answer"] for c in candidates], aggregate)
        return Choice(chosen, {"selected": chosen, "answer": candidates[chosen]["answer"]})

    return assemble(records, completions, errors, scored, stats, choose)
