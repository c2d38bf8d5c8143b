"""Idea-level diversity of code candidates: the policy as judge of whether two programs share an idea.

PlanSearch's own diversity measure (Wang et al., 2024, section 5; the reference's
`search/scripts/check_similar.py`), the one whose value predicts the gain of search:

1. per problem, shuffle the candidates (seeded) and consider the first `limit` (the script's
   `--max-to-consider`, 25);
2. back-translate each considered program into a plain-language idea (judge at temperature 0);
3. for every unordered pair of considered programs, both non-empty, ask the judge whether
   they share the same idea (temperature 0), and read "Yes." or "No." from its reply;
4. the problem's similarity is #Yes / #pairs (a problem without a pair is left out), and the
   idea diversity is 1 - the mean similarity over problems.

This module holds the bookkeeping only (which codes, which pairs, the parse, the means); the
judge's calls are the workflows' (`code_search.CodeRun.judge_ideas`), one batched call for the
back-translations and one for the pairs of every problem in a batch.

Where this departs from the reference, and why: the reference scores a reply 1 when "yes"
occurs anywhere in it (so "No, ... eyes" is a Yes); here the first whole word "yes" or "no"
decides, a reply with neither counts as No (the reference's default) and is counted apart
(`unclear`), so a judge that does not follow the format shows up in the record. A candidate
whose back-translation came back empty (its prompt did not fit the context) is left out, as
the reference leaves out back-translations that failed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

__all__ = [
    "ProblemSimilarity",
    "considered",
    "idea_diversity",
    "judged_pairs",
    "parse_same_idea",
    "problem_similarity",
]

_ANSWER = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def considered(count: int, limit: int, rng: random.Random) -> list[int]:
    """Indices of the candidates to judge: a seeded shuffle of range(count), its first `limit`."""
    if limit < 2:
        raise ValueError(f"idea diversity compares pairs: it needs a limit of at least 2 codes, got {limit}")
    return rng.sample(range(count), count)[:limit]


def judged_pairs(indices: Sequence[int], codes: Sequence[str], ideas: Sequence[str]) -> list[tuple[int, int]]:
    """The unordered pairs (in the order of `indices`) whose programs and ideas are both non-empty.

    `codes` is indexed by candidate, `ideas` by position in `indices`.
    """
    if len(ideas) != len(indices):
        raise ValueError(f"{len(indices)} considered codes but {len(ideas)} back-translations")
    kept = [i for i, idea in zip(indices, ideas, strict=True) if codes[i].strip() and idea.strip()]
    return list(combinations(kept, 2))


def parse_same_idea(reply: str) -> bool | None:
    """The judge's answer: True for Yes, False for No, None when the reply says neither word.

    The first whole word "yes" or "no" (any case) decides: "No. Yes, they both loop" is a No.
    """
    match = _ANSWER.search(reply)
    return None if match is None else match.group(1).lower() == "yes"


@dataclass(frozen=True)
class ProblemSimilarity:
    """One problem's judgements."""

    codes: int
    """Candidates considered (shuffled, at most the limit)."""
    pairs: int
    """Pairs judged (both programs and both ideas non-empty)."""
    same: int
    """Pairs the judge called the same idea."""
    unclear: int
    """Replies with neither "yes" nor "no" (counted as not the same, as the reference does)."""
    similarity: float | None
    """same / pairs; None without a pair (the problem is left out of the mean)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def problem_similarity(codes: int, replies: Sequence[str]) -> ProblemSimilarity:
    """A problem's similarity from the judge's replies, one per judged pair."""
    answers = [parse_same_idea(reply) for reply in replies]
    same = sum(answer is True for answer in answers)
    return ProblemSimilarity(
        codes=codes,
        pairs=len(answers),
        same=same,
        unclear=sum(answer is None for answer in answers),
        similarity=same / len(answers) if answers else None,
    )


def idea_diversity(similarities: Sequence[float | None]) -> float | None:
    """1 - the mean similarity over the problems that had a pair; None when none had."""
    judged = [s for s in similarities if s is not None]
    return 1.0 - sum(judged) / len(judged) if judged else None
