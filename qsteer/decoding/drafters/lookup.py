"""Prompt lookup / input-guided copy (Saxena 2023; Aggressive Decoding's copy): the draft is what
followed the earliest earlier occurrence of the row's last n-gram, in its prompt or its output.

Deterministic drafts: the loop verifies them with the `match` rule (sample from the target,
follow the child equal to the sample), which keeps the output the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qsteer.decoding.drafters.base import Batch, Draft, DraftConfig, Drafter, config_error


@dataclass(frozen=True)
class LookupConfig(DraftConfig):
    kind: Literal["lookup"] = "lookup"
    """Prompt lookup: copy what followed the last n-gram's earliest earlier occurrence."""
    gamma: int = 4
    """Draft tokens per round; transformers uses 10, but on a CPU a longer verify chunk costs more than
    the rare long matches win back (benchmarks/results/speculative_cpu.md)."""
    max_ngram: int = 3
    """Longest suffix n-gram matched."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma < 1:
            raise config_error("gamma", f"must be at least 1, got {self.gamma}")
        if self.max_ngram < 1:
            raise config_error("max_ngram", f"must be at least 1, got {self.max_ngram}")


def find_candidate(ids: list[int], max_ngram: int, num_tokens: int) -> list[int]:
    """Prompt lookup (transformers' PromptLookupCandidateGenerator): the tokens that followed the
    earliest earlier occurrence of the longest matching suffix n-gram."""
    length = len(ids)
    for n in range(min(max_ngram, length - 1), 0, -1):
        suffix = ids[-n:]
        for start in range(length - n):
            if ids[start : start + n] == suffix:
                follow = ids[start + n : min(start + n + num_tokens, length)]
                if follow:
                    return follow
    return []


class LookupDrafter(Drafter):
    rule = "match"

    def __init__(self, cfg: LookupConfig) -> None:
        self.cfg = cfg
        self.max_nodes = cfg.gamma

    def propose(self, batch: Batch) -> Draft:
        rows, gamma = len(batch.history), self.cfg.gamma
        tokens = torch.zeros((rows, gamma), dtype=torch.long)
        valid = torch.zeros((rows, gamma), dtype=torch.bool)
        for r, ids in enumerate(batch.history):
            found = find_candidate(ids, self.cfg.max_ngram, gamma)
            tokens[r, : len(found)] = torch.tensor(found, dtype=torch.long)
            valid[r, : len(found)] = True
        return Draft(tokens, [t - 1 for t in range(gamma)], valid)
