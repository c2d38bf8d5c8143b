"""A tiny random-weight model in the default model's architecture, with its real tokenizer.

Mechanism tests (loops, caches, masks, batching, workflows) need a model's shape, not its
knowledge: this one is SmolLM2's Llama architecture (grouped-query attention, tied embeddings,
RoPE, the same 49152-token vocabulary and chat template) shrunk to 4 layers of width 64, so a
forward pass costs well under a millisecond per token here. It is built offline from a config
and a fixed seed, so every test run sees the same weights; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

TINY_LAYERS = 4


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qsteer.models import resolve_model_path

    source = resolve_model_path("default")  # its tokenizer and config; the weights are not used
    config = AutoConfig.from_pretrained(source)
    config.update(
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": TINY_LAYERS,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         # a wider init than the default 0.02 gives peaked next-token laws, as a trained model has
         "initializer_range": 0.6}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder
