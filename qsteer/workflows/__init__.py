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
    align_baseline,
    args,
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
    transfer_qstar,
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
    whole_dataset: bool = False  # one call over every prompt (a training job), not one per batch
    uses: Callable[[Any], tuple[str, ...]] | None = None  # the roles a given workflow config needs, if fewer

    def needs(self, workflow_cfg: Any) -> tuple[str, ...]:
        """The roles to build for this workflow config."""
        return self.roles if self.uses is None else self.uses(workflow_cfg)


def _transfer_qstar_roles(wf: Any) -> tuple[str, ...]:
    roles = ("baseline", "reward")
    if wf.logit_model == "policy":
        roles = ("policy", *roles)
    return (*roles, "baseline_reward") if wf.transfer == "indirect" else roles


WORKFLOWS: dict[str, Workflow] = {
    "sample": Workflow(sample.run, ("policy", "reward")),
    "best_of_n": Workflow(best_of_n.run, ("policy", "reward")),
    "score": Workflow(score.run, ("reward",)),
    "speculative": Workflow(speculative.run, ("policy", "reward")),
    "controlled_decoding": Workflow(controlled_decoding.run, ("policy", "reward", "value")),
    "train_value": Workflow(train_value.run, ("policy", "reward", "trainer"), finish=train_value.finish),
    "beam_search": Workflow(beam_search.run, ("policy", "reward", "value")),  # value: with workflow.scorer=value
    "dvts": Workflow(dvts.run, ("policy", "reward", "value")),  # value: with workflow.scorer=value
    "repeated_sampling": Workflow(repeated_sampling.run, ("policy", "sandbox")),
    "ideasearch": Workflow(ideasearch.run, ("policy", "sandbox")),
    "plansearch": Workflow(plansearch.run, ("policy", "sandbox")),
    "pgtd": Workflow(pgtd.run, ("policy", "sandbox")),
    "transfer_qstar": Workflow(transfer_qstar.run, ("policy", "baseline", "reward", "baseline_reward"),
                               uses=_transfer_qstar_roles),
    "args": Workflow(args.run, ("policy", "reward")),
    "align_baseline": Workflow(align_baseline.run, ("policy", "reward", "baseline_trainer"),
                               whole_dataset=True),
    # the policy is the reference; the candidate is a second policy-like group (the policy itself by default)
    "win_rate": Workflow(win_rate.run, ("policy", "candidate", "reward")),
    # training: all prompts in one call (the trainer's dataset), the model saved in the run folder
    "ctrl_align": Workflow(ctrl_align.run, ("policy", "reward"), whole_dataset=True),
}

__all__ = ["WORKFLOWS", "Context", "Workflow"]
