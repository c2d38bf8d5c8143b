"""Entropy Adaptive Decoding (EAD; Simonds 2025): switch between a small and a large model by entropy.

EAD is LOSSY: nothing verifies the small model's tokens, so its output differs from the large
model's by design (unlike `decode.py`, whose output stays the policy's). Each step the active
model's next-token entropy H_t (bits, raw logits, before temperature) is recorded; after the
token is emitted the rolling mean over the last `entropy_window` entropies picks the model for
the next step: LARGE if it exceeds `entropy_threshold`, else SMALL, but only once the active
model has produced `min_dwell` tokens since the last switch. Rows start on SMALL, so the first
token is always the small model's; with threshold -inf and min_dwell 0 every later token is the
large model's greedy continuation of prompt + that first token.

Each model keeps its own KV cache (skipped layers write no KV, so a shared cache would be
inconsistent) and lazily catches up on the tokens it has not seen when it becomes active: that
catch-up is the switch cost, counted in `switch_prefill_tokens` (the prompt included, the first
time the large model is used). Rows run one at a time (batch 1: no padding, no mask needed).
"""

from __future__ import annotations

import math

import torch

from qsteer.engines.base import Completion, SamplingParams, sample_seed
from qsteer.engines.hf import new_cache, sample_tokens
from qsteer.speculative import layerskip
from qsteer.speculative.config import SpeculativeConfig

SMALL, LARGE = "small", "large"


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of softmax(logits) over the last axis (xlogy: 0 log 0 = 0 for -inf logits)."""
    p = torch.softmax(logits.float(), dim=-1)
    return -torch.special.xlogy(p, p).sum(-1) / math.log(2)


def next_model(active: str, dwell: int, entropies: list[float], cfg: SpeculativeConfig) -> str:
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
        with layerskip.skipping(self.model, self.skip):
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, logits_to_keep=1)
        self.seen = len(history)
        return out.logits[0, -1].float().cpu(), len(todo)


@torch.inference_mode()
def generate_rows(engine, drafter, cfg: SpeculativeConfig, prompt_ids: list[list[int]], keys: list[str],
                  rows: list[tuple[int, int]], params: SamplingParams) -> list[Completion]:
    if not hasattr(drafter, "model"):
        raise ValueError("draft.mode=ead needs the small model in the policy's process (draft.colocate=true)")
    skip = tuple(getattr(drafter, "skip", ()))
    eos = set(engine.eos_token_ids)
    stop_window = max((len(s) for s in params.stop), default=0) + 2
    completions = []
    for p, j in rows:
        prompt = prompt_ids[p]
        budget = min(params.max_new_tokens, engine.context_length - len(prompt))
        # the plain engine's convention: one uniform per step, drawn up front from the row's own stream
        uniforms = torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(
            sample_seed(params.seed, keys[p], j)))
        capacity = len(prompt) + params.max_new_tokens + 1
        lanes = {SMALL: _Lane(drafter.model, skip, capacity), LARGE: _Lane(engine.model, (), capacity)}
        history, tokens, logprobs, entropies = list(prompt), [], [], []
        active, dwell, switched, finish = SMALL, 0, False, "length"
        spec = {"lossy": True, "small_tokens": 0, "large_tokens": 0, "switches": 0, "switch_prefill_tokens": 0,
                "small_prefill_tokens": 0, "large_prefill_tokens": 0}
        while len(tokens) < budget:
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
            if token in eos or (params.stop and any(
                    s in engine.tokenizer.decode(tokens[-stop_window:]) for s in params.stop)):
                finish = "stop"
                break
            chosen = next_model(active, dwell, entropies, cfg)
            switched = chosen != active
            if switched:
                active, dwell = chosen, 0
                spec["switches"] += 1
        spec["large_fraction"] = spec["large_tokens"] / max(1, len(tokens))
        text = engine.decode(tokens)
        if finish == "stop" and params.stop:
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        completions.append(Completion(tokens, text, logprobs, finish, spec=spec))
    return completions
