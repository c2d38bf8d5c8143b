"""Speculative decoding on the hf engine: a draft proposes, the policy verifies, the output stays the policy's.

`SpeculativeConfig` is the `draft=` config group; `build_drafter` makes its drafter next to an
engine's model; `decode.generate_rows` is the loop; `ead` is the separate, lossy model switch.
"""

from __future__ import annotations

from qsteer.speculative.config import SpeculativeConfig

__all__ = ["SpeculativeConfig", "build_drafter"]


def build_drafter(cfg: SpeculativeConfig, engine, draft_actor=None):
    """The drafter for `cfg`, built beside `engine` (an HFEngine); `draft_actor` serves non-colocated models."""
    from qsteer.speculative import drafters

    if cfg.kind == "lookup":
        return drafters.LookupDrafter(cfg)
    if cfg.kind == "recycle":
        return drafters.RecycleDrafter(cfg, engine.model.config.vocab_size)
    if cfg.kind == "layerskip":
        return drafters.LayerSkipDrafter(engine.model, cfg)
    if not cfg.colocate:
        if draft_actor is None:
            raise ValueError("draft.colocate=false needs a draft actor: run through qsteer's orchestrator "
                             "(it builds the `draft` role) or call PolicyActor.attach_draft")
        from qsteer.actors.draft import RemoteDrafter

        return RemoteDrafter(draft_actor, cfg, engine.tokenizer)
    return drafters.ModelDrafter(load_draft_model(cfg.path, engine), cfg, engine.pad_id)


def load_draft_model(path: str | None, engine):
    """The draft LM for `path` beside `engine`: the policy's own weights when path is null or the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qsteer.models import resolve_model_path

    if path is None or resolve_model_path(path) == engine.path:
        return engine.model
    resolved = resolve_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.get_vocab() != engine.tokenizer.get_vocab():
        raise ValueError(f"draft.path={path!r}: its tokenizer differs from the policy's; a draft must share it")
    model = AutoModelForCausalLM.from_pretrained(
        resolved, dtype=engine.dtype, attn_implementation=engine.model.config._attn_implementation
    ).to(engine.device)
    return model.eval()
