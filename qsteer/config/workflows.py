"""One config dataclass per workflow (`workflow=<name>`); a workflow's own rules live in its `check`.

`WORKFLOW_CONFIGS` maps `workflow.name` to its dataclass. The workflows themselves (in
`qsteer.workflows`) read these by attribute: `ctx.workflow.n`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from qsteer.config.base import Config, Invalid, Range


@dataclass(frozen=True)
class WorkflowConfig(Config):
    """Base of the workflow configs: `name` selects the workflow."""

    name: str = ""
    """The workflow."""


@dataclass(frozen=True)
class BestOfNConfig(WorkflowConfig):
    """Best-of-N: sample `n` completions per prompt, score each with the reward, keep one."""

    name: Literal["best_of_n"] = "best_of_n"
    """Best-of-N."""
    n: Annotated[int, Range(1)] = 4
    """Candidates sampled per prompt."""
    aggregate: Literal["max", "weighted", "majority"] = "max"
    """`max`: the candidate with the highest reward; `weighted`: the answer with the largest reward
    sum (weighted Best-of-N); `majority`: the most frequent answer (self-consistency)."""
    answer_pattern: str | None = None
    """A regex extracting the answer for weighted/majority (its last match, group 1 if it has one);
    null: the last `\\boxed{}`, else the last number."""

    def check(self) -> None:
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as err:
                raise Invalid("answer_pattern", f"is not a valid regex: {err}") from err


@dataclass(frozen=True)
class SampleConfig(WorkflowConfig):
    """Plain sampling, the baseline: `n` samples per prompt, the first is the output."""

    name: Literal["sample"] = "sample"
    """Plain sampling."""
    n: Annotated[int, Range(1)] = 1
    """Samples per prompt, all scored; the first is the output."""


@dataclass(frozen=True)
class ScoreConfig(WorkflowConfig):
    """Score given completions without generating: dataset records need `prompt` and `completion`."""

    name: Literal["score"] = "score"
    """Scoring only."""


@dataclass(frozen=True)
class SpeculativeWorkflowConfig(WorkflowConfig):
    """Speculative decoding with the `draft=` group, and plain decoding beside it for the speedup."""

    name: Literal["speculative"] = "speculative"
    """Speculative decoding."""
    n: Annotated[int, Range(1)] = 1
    """Samples per prompt, all decoded speculatively; the first is the output."""
    baseline: bool = True
    """Also decode plainly in the same run: the speedup, and (at temperature 0) token identity."""


WORKFLOW_CONFIGS: dict[str, type[WorkflowConfig]] = {
    "best_of_n": BestOfNConfig,
    "sample": SampleConfig,
    "score": ScoreConfig,
    "speculative": SpeculativeWorkflowConfig,
}
