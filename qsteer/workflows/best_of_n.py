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

from qsteer.workflows.common import (
    Context,
    Stats,
    candidate,
    generate_and_score,
    record_stats,
    result,
    reward_error,
)

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
    n = int(ctx.workflow["n"])
    aggregate = ctx.workflow.get("aggregate", "max")
    pattern = ctx.workflow.get("answer_pattern")
    stats = Stats()
    completions, errors, scored = generate_and_score(records, ctx, n, stats)
    out = []
    for record, comps, err, rewards in zip(records, completions, errors, scored, strict=True):
        if comps is None:
            out.append(result(record, None, None, [], record_stats(stats, len(records), None, record["id"]), err))
            continue
        answers = [extract_answer(c.text, pattern) for c in comps] if aggregate != "max" else [None] * n
        chosen = select([r for r, _ in rewards], answers, aggregate)
        cands = [candidate(c.text, r, info, c) for c, (r, info) in zip(comps, rewards, strict=True)]
        extra = {"selected": chosen}
        if aggregate != "max":
            extra["answer"] = answers[chosen]
            for cand, answer in zip(cands, answers, strict=True):
                cand["answer"] = answer
        out.append(
            result(record, comps[chosen].text, rewards[chosen][0], cands,
                   record_stats(stats, len(records), comps, record["id"]), reward_error(rewards), **extra)
        )
    return out
