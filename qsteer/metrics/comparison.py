"""Head-to-head comparison of two methods scored on the same prompts."""

from __future__ import annotations

import math


def win_rate(a: list[float], b: list[float]) -> float:
    """Fraction of prompts on which method A's score beats method B's, ties counting half.

    `a[i]` and `b[i]` must score the same prompt; 0.5 means the methods are even.
    """
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores; got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("win_rate needs at least one pair of scores")
    pairs = list(zip(a, b, strict=True))
    # A NaN compares false both ways and would silently count as a loss for whichever side is `a`.
    if any(math.isnan(x) or math.isnan(y) for x, y in pairs):
        raise ValueError("win_rate got a NaN score; drop or fill failed prompts first")
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs)
    return wins / len(a)
