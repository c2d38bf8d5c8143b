"""Idea-level diversity's bookkeeping (qsteer.metrics.idea_diversity) on exact small cases.

The judge's calls are checked with the scripted policy in tests/test_code_workflows.py; here:
which codes are considered, which pairs are judged, how a reply is read, and the means.
"""

from __future__ import annotations

import random
from itertools import combinations

import pytest

from qsteer.metrics.idea_diversity import (
    considered,
    idea_diversity,
    judged_pairs,
    parse_same_idea,
    problem_similarity,
)


@pytest.mark.parametrize(("reply", "answer"), [
    ("Yes.", True), ("No.", False), ("yes", True), ("NO", False), (" Yes, both sort first.", True),
    ("No. Yes, they both loop.", False),  # the first answer decides (the reference's rule would say Yes)
    ("The two share an idea: yes.", True),
    ("Their eyes differ; nope.", None),  # whole words only: "eyes" is no yes, "nope" no no
    ("Perhaps.", None), ("", None),
])
def test_a_reply_is_read_by_its_first_whole_word_yes_or_no(reply, answer):
    assert parse_same_idea(reply) is answer


def test_similarity_is_the_share_of_yes_over_the_pairs():
    s = problem_similarity(4, ["Yes.", "No.", "Yes.", "maybe", "No.", "No."])
    assert (s.codes, s.pairs, s.same, s.unclear) == (4, 6, 2, 1)
    assert s.similarity == pytest.approx(2 / 6)
    assert problem_similarity(1, []).similarity is None  # no pair: left out of the mean
    assert problem_similarity(3, ["Yes."] * 3).similarity == 1.0
    assert problem_similarity(3, ["No."] * 3).similarity == 0.0


def test_diversity_is_one_minus_the_mean_similarity_over_problems_with_pairs():
    assert idea_diversity([1.0, 1.0]) == 0.0  # a judge that always says yes
    assert idea_diversity([0.0, 0.0, 0.0]) == 1.0  # one that never does
    assert idea_diversity([1 / 3, None, 0.0]) == pytest.approx(1 - (1 / 3) / 2)
    assert idea_diversity([None, None]) is None
    assert idea_diversity([]) is None


def test_considered_codes_are_a_seeded_shuffle_cut_at_the_limit():
    first = considered(10, 4, random.Random("p/0"))
    assert first == considered(10, 4, random.Random("p/0")) and len(set(first)) == 4
    assert set(first) <= set(range(10))
    assert sorted(considered(3, 25, random.Random(1))) == [0, 1, 2]  # fewer codes than the limit: all of them
    assert considered(0, 25, random.Random(1)) == []
    # the cut is the shuffle's prefix: a larger limit extends it
    assert considered(10, 6, random.Random("p/0"))[:4] == first
    with pytest.raises(ValueError, match="at least 2"):
        considered(5, 1, random.Random(0))


def test_pairs_skip_empty_programs_and_failed_back_translations():
    codes = ["a = 1", "", "b = 2", "c = 3", "d = 4"]
    indices = [4, 0, 1, 3, 2]
    ideas = ["idea d", "idea a", "idea of nothing", "", "idea b"]  # code 3's back-translation came back empty
    assert judged_pairs(indices, codes, ideas) == [(4, 0), (4, 2), (0, 2)]
    everything = judged_pairs(range(4), ["x"] * 4, ["i"] * 4)
    assert everything == list(combinations(range(4), 2)) and len(everything) == 6
    with pytest.raises(ValueError, match="back-translations"):
        judged_pairs([0, 1], codes, ["one"])
