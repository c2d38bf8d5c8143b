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


def text_hash(prompts, completions, **kwargs):
    """A reward continuous in distribution: the completion's blake2b hash as a number in [0, 1).
    Different texts (almost surely) get different rewards, so win rates have no ties but repeats."""
    import hashlib

    return [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") / 2.0**64
            for c in completions]


def text_hash_affine(prompts, completions, **kwargs):
    """3 r + 1 of `text_hash`: an increasing map of it."""
    return [3.0 * r + 1.0 for r in text_hash(prompts, completions)]


def text_hash_exp(prompts, completions, **kwargs):
    """exp r of `text_hash`: an increasing map of it."""
    import math

    return [math.exp(r) for r in text_hash(prompts, completions)]


def constant(prompts, completions, **kwargs):
    """Every completion ties."""
    return [1.0 for _ in completions]
