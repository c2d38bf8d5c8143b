"""The `draft=` group: how the policy drafts, and where a draft model runs.

How to draft is the decoding layer's config, one dataclass per drafter kind (`DRAFT_CONFIGS`);
the engine receives exactly those fields. Where a model draft runs (`colocate`, `actor`) is the
orchestrator's business, so it is added here, in `ModelDraftGroup`, and marked as a resource:
moving a draft never changes what a run writes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from qsteer.config.base import Range, resource
from qsteer.config.resources import Resources
from qsteer.decoding import DRAFT_CONFIGS


@dataclass(frozen=True)
class DraftActorConfig(Resources):
    """The draft model's own actors (`draft=model` with `colocate: false`)."""

    num_threads: Annotated[int, Range(1)] | None = resource(None)
    """Torch threads per draft actor; null: all the node's cores (drafting and verifying alternate)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = resource("auto")
    """`auto`: bfloat16 on CUDA, float32 on CPU."""
    device: str = resource("auto")
    """`auto` picks CUDA when present."""


_ModelDraft: Any = DRAFT_CONFIGS["model"]


@dataclass(frozen=_ModelDraft.__dataclass_params__.frozen)
class ModelDraftGroup(_ModelDraft):
    """Another causal LM with the policy's tokenizer drafts, the policy verifies."""

    colocate: bool = resource(True)
    """true: the draft model is loaded inside each policy actor; false: it runs in its own actors (`actor`)."""
    actor: DraftActorConfig = resource(default_factory=DraftActorConfig)
    """The draft actors when `colocate` is false."""


DRAFT_GROUPS: dict[str, type] = {**DRAFT_CONFIGS, "model": ModelDraftGroup}


def decoding_fields(kind: str) -> list[str]:
    """The fields the engine's drafter takes for `kind` (the group's fields less the placement)."""
    return [f.name for f in fields(DRAFT_CONFIGS[kind])]
