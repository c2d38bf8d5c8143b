"""What a guided decoding loop asks of a value: the `ValueFunction` protocol, and weighted sums of values.

A value V(x, y<t) predicts the reward of finishing the prefix with the base policy
(Mudgal et al., 2023, "Controlled Decoding", section 2.1: V* is the base policy's value, not the
optimal policy's). Loops take a value as a collaborator through this protocol and never learn
what is behind it: a scalar head on its own backbone, a Q-head on the frozen policy, a tabular
table in a test, or a Ray actor holding any of these (token ids in, floats out, so the calls
cross process boundaries unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class ValueFunction(Protocol):
    """A prefix scorer over the policy's token ids (prompt and completion so far, one list per row)."""

    def values(self, prefixes: list[list[int]]) -> list[float]:
        """V(prefix) for each prefix: the expected final reward of completing it with the base policy."""
        ...

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        """V(prefix + [z]) for each candidate next token z of each row (a guided loop passes the top-k).

        A Q-head answers from one forward pass over the prefix; a scalar head scores each of the
        k extended prefixes, k forwards per row.
        """
        ...


class WeightedValues:
    """sum_i w_i V_i: the multi-objective form of controlled decoding (section 2.4), no retraining.

    With the tokenwise law p(z|s) exp(alpha * sum_i w_i V_i(s, z)), each weight scales one
    objective's strength relative to the shared alpha.
    """

    def __init__(self, values: Sequence[ValueFunction], weights: Sequence[float]) -> None:
        if len(values) != len(weights) or not values:
            raise ValueError(f"need one weight per value; got {len(values)} values and {len(weights)} weights")
        self.parts = list(zip(values, (float(w) for w in weights), strict=True))

    def values(self, prefixes: list[list[int]]) -> list[float]:
        total = [0.0] * len(prefixes)
        for value, weight in self.parts:
            total = [t + weight * v for t, v in zip(total, value.values(prefixes), strict=True)]
        return total

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        total = [[0.0] * len(c) for c in candidates]
        for value, weight in self.parts:
            part = value.next_values(prefixes, candidates)
            total = [[t + weight * v for t, v in zip(tr, pr, strict=True)] for tr, pr in zip(total, part, strict=True)]
        return total
