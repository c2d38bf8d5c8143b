"""Engines host one causal LM behind one small protocol (see `base.Engine`)."""

from __future__ import annotations

from typing import Any

from qsteer.engines.base import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "build_engine"]


def build_engine(engine: str = "hf", **kwargs: Any) -> Engine:
    """Backends are imported only when chosen, so the hf path never needs vLLM."""
    if engine == "hf":
        from qsteer.engines.hf import HFEngine

        return HFEngine(**kwargs)
    if engine == "vllm":
        from qsteer.engines.vllm import VLLMEngine

        return VLLMEngine(**kwargs)
    raise ValueError(f"model.engine={engine!r} is not one of: hf, vllm")
