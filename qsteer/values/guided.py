"""The guided next-token law of tokenwise controlled decoding, its sampler, and its KL accounting.

Theorem 2.1 of Mudgal et al. (2023): the step policy maximising alpha * advantage - KL(pi || p) is

    pi_alpha(z | s) = p(z | s) exp(alpha V([s, z])) / Z(s),

here restricted to the policy's top-k tokens and renormalised there (the spec's [I] choice; with
k = vocabulary size it is the theorem's law). Everything is a pure function of tensors [B, k]
(the top-k tokens, their log-probabilities under the base, their values), so the loop that calls
it (decoding/, on either engine) owns the model calls and this module owns the mathematics.

Sampling is by inverse CDF at a uniform the caller draws from the row's own stream, over the
candidates in token-id order: exactly how the hf engine samples top-k, so at alpha = 0 the same
uniform picks the same token as plain top-k sampling (the defining limiting case).

KL accounting (spec 2.4): tokenwise CD reports the exact per-step KL, summed along the sampled
path; blockwise CD reports the Best-of-K bound log K - (K - 1)/K per block (Beirami et al., 2024),
labelled a bound. Adding -log(top-k mass) to the per-step KL gives the KL from the full base law.
"""

from __future__ import annotations

import math

import torch


def guided_logprobs(topk_logprobs: torch.Tensor, values: torch.Tensor, alpha: float) -> torch.Tensor:
    """log pi_alpha over the k candidates [B, k]: log_softmax(log p + alpha V).

    `topk_logprobs` may be the base's full-vocabulary log-probs of the candidates or any
    per-row shift of them (section 0.3: the law is unchanged); -inf marks a candidate to drop.
    """
    if topk_logprobs.shape != values.shape:
        raise ValueError(f"logprobs {tuple(topk_logprobs.shape)} and values {tuple(values.shape)} differ in shape")
    scores = topk_logprobs if alpha == 0 else topk_logprobs + alpha * values
    return torch.log_softmax(scores, dim=-1)


def sample_guided(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, values: torch.Tensor, alpha: float,
                  uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from pi_alpha, by inverse CDF at that row's uniform in [0, 1).

    The candidates are put in token-id order first, the order in which the hf engine's top-k
    sampler accumulates its CDF over the vocabulary, so that a row's token depends only on its
    uniform and its law, and alpha = 0 reproduces plain top-k sampling draw for draw.
    """
    order = topk_ids.argsort(dim=-1)
    ids = topk_ids.gather(-1, order)
    probs = guided_logprobs(topk_logprobs.gather(-1, order), values.gather(-1, order), alpha).exp()
    cdf = probs.cumsum(-1)
    targets = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, targets, right=True).clamp(max=ids.shape[-1] - 1)
    return ids.gather(-1, picked).squeeze(-1)


def step_kl(topk_logprobs: torch.Tensor, values: torch.Tensor, alpha: float, full_base: bool = False
            ) -> torch.Tensor:
    """Exact KL(pi_alpha(.|s) || p_k(.|s)) per row [B], p_k the base restricted to the top-k.

    With `full_base`, the KL from the unrestricted base p instead (pi_alpha puts no mass outside
    the top-k, so it is the same sum plus -log of the top-k's mass under p); `topk_logprobs`
    must then be the base's own log-probs, not a shifted copy.
    """
    log_pi = guided_logprobs(topk_logprobs, values, alpha)
    log_base = torch.log_softmax(topk_logprobs, dim=-1)
    terms = torch.where(log_pi > -math.inf, log_pi.exp() * (log_pi - log_base), torch.zeros_like(log_pi))
    kl = terms.sum(-1).clamp_min(0.0)
    if full_base:
        kl = kl - torch.logsumexp(topk_logprobs, dim=-1)
    return kl


def best_of_k_kl_bound(k: int) -> float:
    """log K - (K - 1)/K: the KL of Best-of-K from its base is at most this (equal without ties).

    Blockwise CD picks the best of K blocks, so by the chain rule its KL is at most this per block.
    """
    if k < 1:
        raise ValueError(f"Best-of-K needs K >= 1, got {k}")
    return math.log(k) - (k - 1) / k
