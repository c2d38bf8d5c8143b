"""Token loops, one module each, over the model primitives in `qsteer.lm`.

- `plain`: one token per row per step, with continuous batching.
- `speculative`: a drafter proposes a tree, the target verifies it; lossless.
- `ead`: Entropy Adaptive Decoding, switching between a small and a large model; lossy.
- `guided`: token-wise guided decoding, p(z|s) exp(alpha * score(s, z)) over the top-k, with the
  score from a `TokenScorer` (controlled decoding's value, Transfer Q*'s Q estimate, ARGS' reward).
- `drafters/`: the speculative loop's draft sources, one module per method.

Loops take their collaborators as arguments through declared protocols (`Drafter`, `TokenScorer`), so this
layer imports nothing above `qsteer.lm`. A draft config is chosen by its `kind`
(`DRAFT_CONFIGS`, the `draft=` config group); `build_drafter` makes an in-process drafter for one.
"""

from __future__ import annotations

from typing import Any

from qsteer.decoding.drafters.base import DraftConfig, Drafter
from qsteer.decoding.drafters.layerskip import LayerSkipConfig, LayerSkipDrafter
from qsteer.decoding.drafters.lookup import LookupConfig, LookupDrafter
from qsteer.decoding.drafters.model import ModelDraftConfig, ModelDrafter
from qsteer.decoding.drafters.recycle import RecycleConfig, RecycleDrafter
from qsteer.decoding.ead import EADConfig
from qsteer.lm.loading import LanguageModel, load_draft_model

DRAFT_CONFIGS: dict[str, type[DraftConfig]] = {
    "lookup": LookupConfig,
    "recycle": RecycleConfig,
    "layerskip": LayerSkipConfig,
    "model": ModelDraftConfig,
    "ead": EADConfig,
}

__all__ = ["DRAFT_CONFIGS", "DraftConfig", "Drafter", "EADConfig", "build_drafter", "draft_config"]


def draft_config(values: dict[str, Any] | DraftConfig) -> DraftConfig:
    """The config dataclass for a `draft=` mapping, chosen by its `kind`; errors name the key."""
    if isinstance(values, DraftConfig):
        return values
    kind = values.get("kind", "lookup")
    if kind not in DRAFT_CONFIGS:
        raise ValueError(f"draft.kind: {kind!r} is not one of {', '.join(DRAFT_CONFIGS)}")
    return DRAFT_CONFIGS[kind].from_dict({**values, "kind": kind})


def _model_drafter(cfg: ModelDraftConfig, lm: LanguageModel) -> Drafter:
    if not cfg.colocate:
        raise ValueError("draft.colocate=false: the draft model lives in a draft actor, whose drafter must be "
                         "passed in (engine.generate(..., drafter=...)); qsteer's orchestrator builds the `draft` "
                         "role and PolicyActor.attach_draft does that")
    return ModelDrafter(load_draft_model(cfg.path, lm), cfg, lm.pad_id)


_BUILDERS = {
    "lookup": lambda cfg, lm: LookupDrafter(cfg),
    "recycle": lambda cfg, lm: RecycleDrafter(cfg, lm.model.config.vocab_size),
    "layerskip": lambda cfg, lm: LayerSkipDrafter(lm.model, cfg),
    "model": _model_drafter,
}


def build_drafter(cfg: DraftConfig, lm: LanguageModel) -> Drafter:
    """The in-process drafter for `cfg`, beside `lm` (the target)."""
    if cfg.kind not in _BUILDERS:
        raise ValueError(f"draft.kind={cfg.kind} is not a drafter of the speculative loop")
    return _BUILDERS[cfg.kind](cfg, lm)
