"""The engine protocol every backend meets: token ids in, token ids and logprobs out."""

from __future__ import annotations

from typing import Protocol

from qsteer.lm.params import SamplingParams, sample_seed
from qsteer.lm.stop import Completion, eos_ids

__all__ = ["Completion", "Engine", "SamplingParams", "check_prompts", "encode_prompts", "eos_ids", "sample_seed"]


def encode_prompts(
    tokenizer, prompts: list[str | list[dict]], chat: bool, use_chat_template: bool
) -> list[list[int]]:
    """Prompts (text or chat messages) to token ids, through the chat template when asked and present."""
    out = []
    for prompt in prompts:
        if chat and use_chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            if isinstance(prompt, list):
                prompt = "\n".join(m["content"] for m in prompt)
            out.append(tokenizer(prompt)["input_ids"])
    return out


def check_prompts(prompt_ids: list[list[int]], keys: list[str], context_length: int) -> None:
    """Refuse an empty or too long prompt by its key, before any work starts."""
    for key, ids in zip(keys, prompt_ids, strict=True):
        if not ids:
            raise ValueError(f"prompt {key!r} is empty")
        if len(ids) >= context_length:
            raise ValueError(f"prompt {key!r} has {len(ids)} tokens; the context length is {context_length}")


class Engine(Protocol):
    context_length: int
    eos_token_ids: list[int]

    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str] | None = None
    ) -> list[list[Completion]]:
        """`n` completions per prompt; `keys[i]` (the prompt's id) names its random streams."""
        ...

    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log-probabilities of each continuation given its prompt (teacher forcing)."""
        ...

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        """The k most likely next tokens of each prefix, with their log-probabilities."""
        ...
