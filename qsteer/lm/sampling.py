"""Sampling: the distribution a row draws from, and the random stream each row draws with.

Every (seed, prompt id, sample index) has its own generator (`sample_seed`), and a token is an
inverse-CDF draw at one uniform from that generator: the token a row picks depends only on its
seed, its id and the model's probabilities, never on its neighbours in a batch.
"""

from __future__ import annotations

import torch

from qsteer.lm.params import SamplingParams, sample_seed


def row_generator(seed: int, key: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, key, index))


def step_uniforms(seed: int, key: str, index: int, steps: int, offset: int = 0) -> torch.Tensor:
    """The plain loop's uniforms of one row: one per step, drawn up front from the row's own stream,
    from its position `offset` on (torch's CPU generator draws a longer run's prefix exactly)."""
    return torch.rand(offset + steps, generator=row_generator(seed, key, index))[offset:]


def uniform_from(generator: torch.Generator):
    """Uniforms one at a time (the speculative loop does not know up front how many it needs)."""
    return lambda: float(torch.rand((), generator=generator, dtype=torch.float64))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) on a [rows, vocab] batch of logits."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the first always stays
        drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling uses (temperature, top-k, top-p), for target and draft alike."""
    flat = logits.reshape(-1, logits.shape[-1])
    if params.temperature == 0:  # greedy drafts and checks use the raw distribution
        return flat.softmax(-1).reshape(logits.shape)
    return filter_logits(flat, params).softmax(-1).reshape(logits.shape)


def sample_tokens(logprobs: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax when greedy, else inverse CDF at that row's own uniform."""
    if params.temperature == 0:
        return logprobs.argmax(-1)
    unfiltered = params.temperature == 1.0 and not params.top_k and params.top_p >= 1.0
    probs = logprobs.exp() if unfiltered else filter_logits(logprobs, params).softmax(-1)
    cdf = probs.cumsum(-1)
    targets = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


def draw(probs: torch.Tensor, uniform: float) -> int:
    """Inverse-CDF draw from an unnormalised probability vector."""
    cdf = probs.cumsum(-1)
    target = torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)
    index = int(torch.searchsorted(cdf, target, right=True))
    return min(index, probs.shape[-1] - 1)
