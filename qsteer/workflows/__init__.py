"""Workflows: one module per method, each a plain function over a batch of records and actor handles.

A workflow never loads a model: it calls the role groups in its `Context`, so the same code
runs on one CPU and on a cluster. `WORKFLOWS` maps `workflow.name` to the function and the
roles it needs; the orchestrator builds only those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qsteer.workflows import (
    beam_search,
    best_of_n,
    controlled_decoding,
    ctrl_align,
    dvts,
    ideasearch,
    pgtd,
    plansearch,
    repeated_sampling,
    sample,
    score,
    speculative,
    train_value,
    win_rate,
)
from qsteer.workflows.common import Context


@dataclass(frozen=True)
class Workflow:
    run: Callable[[list[dict], Context], list[dict]]
    roles: tuple[str, ...]
    # after every batch: over all records of the run folder, returns {"card", "files"} that the
    # orchestrator writes into the run folder (workflow=train_value's checkpoint)
    finish: Callable[[list[dict], Context], dict[str, Any]] | None = None
    whole_dataset: bool = False  # one call with every prompt to do, instead of batches of `batch_size`


WORKFLOWS: dict[str, Workflow] = {
    "sample": Workflow(sample.run, ("policy", "reward")),
    "best_of_n": Workflow(best_of_n.run, ("policy", "reward")),
    "score": Workflow(score.run, ("reward",)),
    "speculative": Workflow(speculative.run, ("policy", "reward")),
    "controlled_decoding": Workflow(controlled_decoding.run, ("policy", "reward", "value")),
    "train_value": Workflow(train_value.run, ("policy", "reward", "trainer"), finish=train_value.finish),
    "beam_search": Workflow(beam_search.run, ("policy", "reward")),
    "dvts": Workflow(dvts.run, ("policy", "reward")),
    "repeated_sampling": Workflow(repeated_sampling.run, ("policy", "sandbox")),
    "ideasearch": Workflow(ideasearch.run, ("policy", "sandbox")),
    "plansearch": Workflow(plansearch.run, ("policy", "sandbox")),
    "pgtd": Workflow(pgtd.run, ("policy", "sandbox")),
    # the policy is the reference; the candidate is a second policy-like group (the policy itself by default)
    "win_rate": Workflow(win_rate.run, ("policy", "candidate", "reward")),
    # training: all prompts in one call (the trainer's dataset), the model saved in the run folder
    "ctrl_align": Workflow(ctrl_align.run, ("policy", "reward"), whole_dataset=True),
}

__all__ = ["WORKFLOWS", "Context", "Workflow"]
