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
