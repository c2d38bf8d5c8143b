"""Entropy Adaptive Decoding (EAD; Simonds 2025): switch between a small and a large model by entropy.

EAD is LOSSY: nothing verifies the small model's tokens, so its output differs from the large
model's by design (unlike `speculative.py`, whose output stays the policy's). Each step the
active model's next-token entropy H_t (bits, raw logits, before temperature) is recorded; after
the token is emitted the rolling mean over the last `entropy_window` entropies picks the model
for the next step: LARGE if it exceeds `entropy_threshold`, else SMALL, but only once the active
model has produced `min_dwell` tokens since the last switch. Rows start on SMALL, so the first
token is always the small model's; with threshold -inf and min_dwell 0 every later token is the
large model's greedy continuation of prompt + that first token.

Each model keeps its own KV cache (skipped layers write no KV, so a shared cache would be
inconsistent) and lazily catches up on the tokens it has not seen when it becomes active: that
catch-up is the switch cost, counted in `switch_prefill_tokens` (the prompt included, the first
time the large model is used). Rows run one at a time (batch 1: no padding, no mask needed).
Sampling follows the plain loop's convention (one uniform per step from the row's own stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from qsteer.decoding.drafters.base import DraftConfig, config_error
from qsteer.decoding.drafters.layerskip import normalise_skip, skip_set, skipping
from qsteer.lm.cache import new_cache
from qsteer.lm.loading import LanguageModel, load_draft_model
from qsteer.lm.sampling import SamplingParams, sample_tokens, step_uniforms
from qsteer.lm.stop import Completion

SMALL, LARGE = "small", "large"


@dataclass(frozen=True)
class EADConfig(DraftConfig):
    kind: Literal["ead"] = "ead"
    """Entropy Adaptive Decoding: a small and a large model take turns by entropy (LOSSY: not the policy's output)."""
    small: Literal["layerskip", "model"] = "layerskip"
    """The small model: the policy with sub-blocks skipped, or another LM (`path`) with the policy's tokenizer."""
    path: str | None = None
    """small=model: the small LM's folder or hub id; null uses the policy's own weights."""
    skip_ratio: float = 0.45
    """small=layerskip: share of the sub-blocks of layers 1..L-2 skipped."""
    skip: tuple[tuple[str, int], ...] | None = None
    """small=layerskip: explicit [[attn|mlp, layer], ...] to skip; overrides skip_ratio."""
    entropy_threshold: float = 2.0
    """Bits: the large model decodes while the rolling mean entropy is above it."""
    entropy_window: int = 5
    """Steps in the rolling mean of the entropy."""
    min_dwell: int = 4
    """Tokens a model emits after a switch before the next switch may happen."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.small not in ("layerskip", "model"):
            raise config_error("small", f"{self.small!r} is not one of layerskip, model")
        if not 0 <= self.skip_ratio < 1:
            raise config_error("skip_ratio", f"must be in [0, 1), got {self.skip_ratio}")
        if self.entropy_window < 1:
            raise config_error("entropy_window", f"must be at least 1, got {self.entropy_window}")
        if self.min_dwell < 0:
            raise config_error("min_dwell", f"must be at least 0, got {self.min_dwell}")
        if self.skip is not None:
            object.__setattr__(self, "skip", normalise_skip(self.skip))


@dataclass
class SmallModel:
    """EAD's small model: a model and the sub-blocks it runs without."""

    model: torch.nn.Module
    skip: tuple[tuple[str, int], ...]


def small_model(cfg: EADConfig, lm: LanguageModel) -> SmallModel:
    if cfg.small == "model":
        return SmallModel(load_draft_model(cfg.path, lm), ())
    return SmallModel(lm.model, skip_set(lm.model, cfg.skip, cfg.skip_ratio))


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of softmax(logits) over the last axis (xlogy: 0 log 0 = 0 for -inf logits)."""
    p = torch.softmax(logits.float(), dim=-1)
    return -torch.special.xlogy(p, p).sum(-1) / math.log(2)


def next_model(active: str, dwell: int, entropies: list[float], cfg: EADConfig) -> str:
    """The model for the next step, from the entropies so far and the tokens `dwell` since the last switch."""
    if dwell < cfg.min_dwell:
        return active
    window = entropies[-cfg.entropy_window:]
    return LARGE if sum(window) / len(window) > cfg.entropy_threshold else SMALL


class _Lane:
    """One model (with its skipped sub-blocks) on its own cache; `seen` row tokens are in the cache."""

    def __init__(self, model, skip, capacity: int) -> None:
        self.model, self.skip, self.seen = model, skip, 0
        self.cache = new_cache(model, capacity)
        self.device = next(model.parameters()).device

    def catch_up(self, history: list[int]) -> tuple[torch.Tensor, int]:
        todo = history[self.seen:]
        ids = torch.tensor([todo], device=self.device)
        positions = torch.arange(self.seen, len(history), device=self.device)[None]
        with skipping(self.model, self.skip):
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, logits_to_keep=1)
        self.seen = len(history)
        return out.logits[0, -1].float().cpu(), len(todo)


@torch.inference_mode()
def generate_rows(lm: LanguageModel, small: SmallModel, cfg: EADConfig, prompt_ids: list[list[int]],
                  keys: list[str], rows: list[tuple[int, int]], params: SamplingParams) -> list[Completion]:
    stop = lm.stop_rule(params.stop)
    completions = []
    for p, j in rows:
        prompt = prompt_ids[p]
        budget = lm.budget(len(prompt), params.max_new_tokens)
        uniforms = step_uniforms(params.seed, keys[p], j, params.max_new_tokens)
        capacity = len(prompt) + params.max_new_tokens + 1
        lanes = {SMALL: _Lane(small.model, small.skip, capacity), LARGE: _Lane(lm.model, (), capacity)}
        history, tokens, logprobs, entropies = list(prompt), [], [], []
        active, dwell, switched, finish = SMALL, 0, False, None
        spec = {"lossy": True, "small_tokens": 0, "large_tokens": 0, "switches": 0, "switch_prefill_tokens": 0,
                "small_prefill_tokens": 0, "large_prefill_tokens": 0}
        while finish is None:
            logits, fed = lanes[active].catch_up(history)
            if switched or not tokens:
                spec[f"{active}_prefill_tokens"] += fed
                spec["switch_prefill_tokens"] += fed if switched else 0
            entropies.append(float(entropy_bits(logits)))
            raw = torch.log_softmax(logits, dim=-1)
            token = int(sample_tokens(raw[None], params, uniforms[len(tokens)][None])[0])
            tokens.append(token)
            logprobs.append(float(raw[token]))
            history.append(token)
            spec[f"{active}_tokens"] += 1
            dwell += 1
            finish = stop.reason(tokens, budget)
            if finish == "stop":
                break
            chosen = next_model(active, dwell, entropies, cfg)
            switched = chosen != active
            if switched:
                active, dwell = chosen, 0
                spec["switches"] += 1
        spec["large_fraction"] = spec["large_tokens"] / max(1, len(tokens))
        completions.append(stop.completion(tokens, logprobs, finish, spec=spec))
    return completions
