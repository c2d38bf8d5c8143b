"""Workflows: one module per method, each a plain function over a batch of records and actor handles.

A workflow never loads a model: it calls the role groups in its `Context`, so the same code
runs on one CPU and on a cluster. `WORKFLOWS` maps `workflow.name` to the function and the
roles it needs; the orchestrator builds only those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qsteer.workflows import best_of_n, sample, score, speculative
from qsteer.workflows.common import Context


@dataclass(frozen=True)
class Workflow:
    run: Callable[[list[dict], Context], list[dict]]
    roles: tuple[str, ...]


WORKFLOWS: dict[str, Workflow] = {
    "sample": Workflow(sample.run, ("policy", "reward")),
    "best_of_n": Workflow(best_of_n.run, ("policy", "reward")),
    "score": Workflow(score.run, ("reward",)),
    "speculative": Workflow(speculative.run, ("policy", "reward")),
}

__all__ = ["WORKFLOWS", "Context", "Workflow"]
