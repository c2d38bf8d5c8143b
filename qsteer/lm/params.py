"""What a caller asks of a token loop (`SamplingParams`) and the seed of each row's random stream.

Free of torch, so the command line and configs can use it without loading a model stack.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    speculative: dict | None = None  # a draft config (the fields of a `qsteer.decoding.DRAFT_CONFIGS` class)
    # the first token of this call is token `offset` of each row's random stream: a continuation
    # (blockwise CD's next block) draws what one longer call would have drawn there
    offset: int = 0
    # Per prompt (None: every prompt alike): `offsets[i]` replaces `offset` for prompt i (a search
    # step continues each candidate's own stream where its beam stopped, so a search of one beam
    # and one candidate is plain sampling, token for token); `budgets[i]` is prompt i's own
    # max_new_tokens (a beam's share of the budget left).
    offsets: list[int] | None = None
    budgets: list[int] | None = None
    # the samples are first_sample .. first_sample + n - 1 of each prompt's streams: a generation
    # cache holding samples 0..3 asks for 4..7 alone, and gets what an n=8 call would give there
    first_sample: int = 0

    def stream_offset(self, prompt: int) -> int:
        return self.offsets[prompt] if self.offsets is not None else self.offset

    def budget(self, prompt: int) -> int:
        return self.budgets[prompt] if self.budgets is not None else self.max_new_tokens


def sample_seed(seed: int, key: str, index: int) -> int:
    """The random stream of sample `index` of prompt `key`: independent of batching and order."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


