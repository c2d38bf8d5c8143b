"""Transfer Q* (Chakraborty et al., 2024): the optimal Q of a target reward, estimated from an aligned baseline's rollouts.

The target's trajectory-level optimum from a state s is rho*(tau | s) ∝ pi_ref(tau | s) exp(r(s, tau) / beta)
and Q*(s, z) = E_{tau ~ rho*(.|[s, z])} r([s, z, tau]) (spec 3.1). Decoding samples
pi_ref(z | s) exp(alpha Q*(s, z)) over the reference's top-k (the guided law of `values.guided`,
with Q* as the value), so this module only turns rollouts into Q-estimates; the loop that draws
the rollouts and picks tokens lives in decoding/ and workflows/.

Inputs are tensors [..., k, m]: for each of k candidate tokens of a row, m rollouts tau_j drawn
from the baseline rho_BL starting at [s, z], with the target reward r_j of [s, z, tau_j] and,
for indirect transfer, the baseline reward r_BL,j (or the rollouts' log-probabilities).

- **direct** (r_BL = r, so rho_BL ≈ rho*): Q = (1/m) sum_j r_j (spec 3.2 [P]).
- **indirect** (rho_BL ∝ pi_ref exp(r_BL / beta)): rho* / rho_BL = exp((r - r_BL) / beta) Z_BL / Z*,
  so with w_j = exp((r_j - r_BL,j) / beta)
  - `normalized`: Q = sum_j w_j r_j / sum_j w_j, self-normalised importance sampling: the unknown
    Z_BL / Z* cancels and the estimate is consistent in m (spec [I], the recommended flag);
  - `reference`: Q = (1/m) sum_j w_j r_j, the reference code's unnormalised score (indirect.py:
    `exp(0.5 * (r_target - r_BL)) * r_target`, m = 1, 1/beta = 0.5, labelled in records). Its
    expectation is Q*(s, z) Z*([s, z]) / Z_BL([s, z]): a scale that differs between candidate
    tokens, so it can rank them differently from Q* (tests/test_transfer_qstar.py builds one).
- **likelihood** weights (spec [I]): w_j = exp(r_j / beta + log pi_ref(tau_j) - log rho_BL(tau_j)),
  exact importance weights of rho* against any baseline, without assuming how it was aligned;
  they need the reference's log-probs of the rollouts (one teacher-forced score call).

With all weights equal (r_BL = r) the normalised estimate is computed with weights exactly 1 and
the same reduction as direct transfer, so it is bit-identical to it (a checked property).
"""

from __future__ import annotations

from typing import Literal

import torch

from qsteer.values.guided import guided_logprobs, sample_guided

Transfer = Literal["direct", "indirect"]
Estimator = Literal["normalized", "reference"]
Weights = Literal["reward", "likelihood"]


def reward_log_weights(rewards: torch.Tensor, baseline_rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log w = (r - r_BL) / beta: rho*/rho_BL up to a per-state constant when rho_BL ∝ pi_ref e^{r_BL/beta}."""
    if rewards.shape != baseline_rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and baseline rewards {tuple(baseline_rewards.shape)} "
                         "differ in shape")
    return (rewards - baseline_rewards) / beta


def likelihood_log_weights(rewards: torch.Tensor, reference_logprobs: torch.Tensor, baseline_logprobs: torch.Tensor,
                           beta: float) -> torch.Tensor:
    """log w = r / beta + log pi_ref(tau) - log rho_BL(tau): rho*/rho_BL up to a per-state constant, any rho_BL.

    The log-probs are each rollout's summed token log-probabilities given [s, z], under the
    reference and under the baseline that drew it.
    """
    if not rewards.shape == reference_logprobs.shape == baseline_logprobs.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, reference log-probs {tuple(reference_logprobs.shape)} "
                         f"and baseline log-probs {tuple(baseline_logprobs.shape)} differ in shape")
    return rewards / beta + reference_logprobs - baseline_logprobs


def estimate_q(rewards: torch.Tensor, log_weights: torch.Tensor | None = None,
               estimator: Estimator = "normalized") -> torch.Tensor:
    """Q-estimates [..., k] from rollout rewards [..., k, m] and their log importance weights.

    `log_weights=None` is direct transfer: the plain mean. `normalized` shifts each candidate's log
    weights by their maximum before exponentiating (so equal weights are exactly 1); `reference`
    uses the raw weights, as the reference code does.
    """
    m = rewards.shape[-1]
    if m < 1:
        raise ValueError("Transfer Q* needs at least one rollout per candidate")
    if log_weights is None:
        return rewards.sum(-1) / m
    if log_weights.shape != rewards.shape:
        raise ValueError(f"log weights {tuple(log_weights.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    if estimator == "normalized":
        weights = torch.exp(log_weights - log_weights.amax(-1, keepdim=True))
        return (weights * rewards).sum(-1) / weights.sum(-1)
    if estimator == "reference":
        return (torch.exp(log_weights) * rewards).sum(-1) / m
    raise ValueError(f"estimator {estimator!r} is not one of: normalized, reference")


def transfer_q(rewards: torch.Tensor, transfer: Transfer = "direct", estimator: Estimator = "normalized",
               beta: float = 2.0, baseline_rewards: torch.Tensor | None = None, weights: Weights = "reward",
               reference_logprobs: torch.Tensor | None = None,
               baseline_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Q*-estimates [..., k] of one step's candidates from their rollouts [..., k, m] (spec 3.2)."""
    if transfer == "direct":
        return estimate_q(rewards)
    if transfer != "indirect":
        raise ValueError(f"transfer {transfer!r} is not one of: direct, indirect")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if weights == "reward":
        if baseline_rewards is None:
            raise ValueError("indirect transfer with reward weights needs the baseline reward of every rollout")
        log_w = reward_log_weights(rewards, baseline_rewards, beta)
    elif weights == "likelihood":
        if reference_logprobs is None or baseline_logprobs is None:
            raise ValueError("likelihood weights need the reference's and the baseline's log-probs of every rollout")
        log_w = likelihood_log_weights(rewards, reference_logprobs, baseline_logprobs, beta)
    else:
        raise ValueError(f"weights {weights!r} is not one of: reward, likelihood")
    return estimate_q(rewards, log_w, estimator)


def choose_tokens(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, q: torch.Tensor, alpha: float, greedy: bool,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row [B] from the scores log p(z) + alpha Q(z) over the k candidates (spec 3.3 steps 5-6).

    Greedy (the reference code's default) takes the argmax, ties to the earlier candidate (the more
    likely one under the logit model, so alpha = 0 is greedy decoding); otherwise the guided law is
    sampled by inverse CDF at each row's uniform, which at alpha = 0 is the logit model's top-k sampling.
    """
    if greedy:
        scores = guided_logprobs(topk_logprobs, q, alpha)
        return topk_ids.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)
    if uniforms is None:
        raise ValueError("sampled Transfer Q* needs one uniform per row")
    return sample_guided(topk_ids, topk_logprobs, q, alpha, uniforms)
