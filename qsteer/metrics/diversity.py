"""Lexical diversity of generated text."""

from __future__ import annotations


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n of Li et al. (2016): unique n-grams / total n-grams over all texts.

    Tokens are whitespace-separated words; n-grams never span two texts. Pooling over the
    texts (rather than averaging per text) is what makes it measure repetition *across*
    samples, e.g. Best-of-N candidates collapsing onto one phrasing. 0.0 when no text has
    n tokens.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = text.split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0
