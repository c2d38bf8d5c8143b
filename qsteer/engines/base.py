"""The engine protocol every backend meets: token ids in, token ids and logprobs out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    speculative: dict | None = None  # a draft config (qsteer.speculative.SpeculativeConfig fields): decode with it


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    # log-probability of each generated token under the model at temperature 1 (as `score` gives)
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    spec: dict | None = None  # speculative decoding counts (rounds, drafted, accepted, ...) when used


def sample_seed(seed: int, key: str, index: int) -> int:
    """The random stream of sample `index` of prompt `key`: independent of batching and order."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def eos_ids(tokenizer_eos: int | None, generation_eos: int | list[int] | None) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the generation config's."""
    if not isinstance(generation_eos, (list, tuple)):
        generation_eos = [generation_eos]
    return sorted({t for t in (tokenizer_eos, *generation_eos) if t is not None})


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
