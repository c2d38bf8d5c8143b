"""Best-of-N's selection rules and answer extraction, as pure functions."""

from __future__ import annotations

import pytest

from qsteer.workflows.best_of_n import extract_answer, select


def test_max_picks_the_highest_reward_and_the_earliest_on_ties():
    assert select([0.1, 0.9, 0.3], [None] * 3, "max") == 1
    assert select([0.5, 0.5, 0.2], [None] * 3, "max") == 0
    assert select([None, -0.2, None], [None] * 3, "max") == 1
    assert select([0.7], [None], "max") == 0  # n=1 is plain sampling


def test_majority_and_weighted_differ_where_they_should():
    answers = ["3", "3", "3", "7"]
    rewards = [0.1, 0.1, 0.1, 0.9]
    assert answers[select(rewards, answers, "majority")] == "3"  # 3 votes against 1
    assert select(rewards, answers, "weighted") == 3  # 0.9 of weight against 0.3
    # within the winning answer, the best-rewarded candidate is the output
    assert select([0.2, 0.6, 0.1, 0.0], ["3", "3", "3", "7"], "majority") == 1


def test_candidates_without_an_answer_do_not_vote():
    assert select([0.9, 0.2, 0.3], [None, "5", "5"], "majority") == 2
    assert select([0.9, 0.2], [None, None], "weighted") == 0  # nothing to vote on: plain max


@pytest.mark.parametrize(
    ("text", "pattern", "answer"),
    [
        ("so the total is 1,234 apples", None, "1234"),
        ("first 3 then 4.5", None, "4.5"),
        (r"we get \boxed{42} and 7 more", None, "42"),
        ("no digits here", None, None),
        ("Answer: B. (not A)", r"Answer:\s*([A-D])", "B"),
        ("-12 degrees", None, "-12"),
    ],
)
def test_extract_answer(text, pattern, answer):
    assert extract_answer(text, pattern) == answer
