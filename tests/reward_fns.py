"""Reward functions written the way TRL users write them, used unchanged by the CLI tests."""

from __future__ import annotations


def word_count(prompts, completions, **kwargs):
    """A TRL-signature reward: more words, more reward."""
    return [float(len(c.split())) for c in completions]


def fails_on_marked_prompts(prompts, completions, id, **kwargs):
    """Raises whenever a batch holds a record whose id ends with '-bad'."""
    if any(str(i).endswith("-bad") for i in id):
        raise RuntimeError("reward service refused this item")
    return [1.0 for _ in completions]


def always_fails(prompts, completions, **kwargs):
    """A reward service that is down."""
    raise ConnectionError("reward service unreachable")


def first_passes_second_crashes(prompts, completions, id, **kwargs):
    """A pass/fail scorer: sent-000 passes, sent-001 crashes the scorer, the rest fail."""
    if "sent-001" in id:
        raise RuntimeError("scorer crashed")
    return [1.0 if i == "sent-000" else 0.0 for i in id]


first_passes_second_crashes.pass_fail = True
