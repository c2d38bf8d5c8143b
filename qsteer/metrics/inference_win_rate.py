"""Win rate of a candidate policy against the reference under an inference-time procedure, and their KL.

(Not named `win_rate.py`: `qsteer.metrics.win_rate` is the package's paired comparison function,
and a submodule of that name would replace it on import.)

InfAlign's win rate of pi_A over pi_B under a procedure T (one sample, Best-of-N, worst-of-N),
judged by a reward r, ties counting half:

    W = P(r(T(pi_A)) > r(T(pi_B))) + 1/2 P(r(T(pi_A)) = r(T(pi_B)))

Per prompt it is computed exactly from the rewards of each side's samples (a pool of m >= N per
side), never by resampling. If a side's pool has c(v) rewards <= v, the reward of T applied to
N draws from that pool has CDF H(v), and

    W = sum_v [H_A(v) - H_A(v^-)] · [H_B(v^-) + 1/2 (H_B(v) - H_B(v^-))]

over the candidate's distinct rewards v. With `draws="subsets"` (the default) the N draws are
N distinct samples of the pool, H_bon(v) = C(c(v), N) / C(m, N) (the law of the maximum of a
random N-subset), H_won(v) = 1 - C(m - c(v), N) / C(m, N): W is then the average of
1{max A_S > max B_S'} + 1/2 1{=} over every pair of N-subsets, a two-sample U-statistic, so it
is an unbiased estimate of the policies' win rate for any pool size m >= N (with m = N it is
the comparison of the two pools' best samples). With `draws="replacement"` the draws are with
replacement, H_bon = (c/m)^N, H_won = 1 - (1 - c/m)^N: the plug-in closed form of the spec's
§1.4, smoother but biased at small pools: Best-of-N of pi_ref against one pi_ref sample gives
1 - sum_{k=0..m} (k/m)^N / (m+1) on average instead of N/(N+1), for N = 4 0.723 at m = 4 and
0.781 at m = 16 (tests/test_win_rate.py enumerates it). `opponent="sample"`
compares T(pi_A) with one plain sample of pi_B (Best-of-N of pi_ref against pi_ref: N/(N+1)),
the default `"procedure"` passes both sides through T, as InfAlign's inference-time win rate does.

The interval is over prompts (each prompt's W is one independent draw): mean ± z·sd/sqrt(P),
clipped to [0, 1].

The KL of the candidate to the reference, E_{y~pi}[log pi(y|x) - log pi_ref(y|x)], is estimated
from per-token log-probabilities of the candidate's own samples under both models, summed over
a sample's tokens: k1 = sum_t (log pi - log pi_ref), and k3 = sum_t (rho_t - 1 - log rho_t)
with rho_t = pi_ref/pi of the sampled token (Schulman's estimator, the one TRL's GRPOTrainer
uses; RLOOTrainer uses k1). Both are unbiased for the sequence KL, token by token given the
prefix, when the samples were drawn from pi itself, i.e. at temperature 1 with no top-p or
top-k, and the log-probabilities are the model's raw ones: otherwise they estimate the KL of
the untempered model, not of what was sampled. k3 is never negative and has the smaller
variance when pi is close to pi_ref; k1 is the objective's own term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

Procedure = Literal["sample", "bon", "won"]
PROCEDURES: tuple[str, ...] = ("sample", "bon", "won")


@dataclass(frozen=True)
class WinRate:
    """A win rate over prompts with its confidence interval (`metrics.win_rate`, `..._ci_low`, `..._ci_high`)."""

    win_rate: float
    ci_low: float
    ci_high: float
    num_prompts: int
    procedure: str
    n: int
    opponent: str
    draws: str
    per_prompt: tuple[float, ...]


def procedure_cdf(counts: np.ndarray, pool: int, procedure: str, n: int, draws: str = "subsets") -> np.ndarray:
    """P(reward of T(N draws from the pool) <= v), given c(v) = `counts` of the pool's rewards <= v."""
    counts = np.asarray(counts, dtype=np.float64)
    if procedure == "sample":
        return counts / pool
    if procedure not in PROCEDURES:
        raise ValueError(f"unknown procedure {procedure!r}; choose one of {PROCEDURES}")
    # For worst-of-N, min <= v unless all N draws are above v: count those draws instead.
    favourable = counts if procedure == "bon" else pool - counts
    if draws == "replacement":
        none_above = (favourable / pool) ** n
    elif draws == "subsets":
        if pool < n:
            raise ValueError(f"draws='subsets' needs at least N={n} samples per side and prompt, got {pool}")
        # C(c, N) / C(m, N) = prod_j (c - j) / (m - j); zero once c < N.
        ratios = (favourable[:, None] - np.arange(n)) / (pool - np.arange(n))
        none_above = np.prod(np.clip(ratios, 0.0, None), axis=1)
    else:
        raise ValueError(f"unknown draws {draws!r}; choose 'subsets' or 'replacement'")
    return none_above if procedure == "bon" else 1.0 - none_above


def prompt_win_rate(
    candidate: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    procedure: str = "sample",
    n: int = 1,
    opponent: Literal["procedure", "sample"] = "procedure",
    draws: Literal["subsets", "replacement"] = "subsets",
) -> float:
    """One prompt's win rate of the candidate's samples (rewards) over the reference's, ties as half.

    `n` is the procedure's N (Best-of-N, worst-of-N); plain sampling ignores it.
    """
    a = np.sort(np.asarray(candidate, dtype=np.float64))
    b = np.sort(np.asarray(reference, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("prompt_win_rate needs at least one reward per side")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("prompt_win_rate got a NaN reward; drop or fill failed samples first")
    if n < 1:
        raise ValueError(f"the procedure's N must be >= 1, got {n}")
    values = np.unique(a)
    b_procedure, b_n = (procedure, n) if opponent == "procedure" else ("sample", 1)

    def cdf(pool: np.ndarray, side: str, proc: str, size: int) -> np.ndarray:
        return procedure_cdf(np.searchsorted(pool, values, side=side), pool.size, proc, size, draws)

    mass_a = cdf(a, "right", procedure, n) - cdf(a, "left", procedure, n)
    below_b, upto_b = cdf(b, "left", b_procedure, b_n), cdf(b, "right", b_procedure, b_n)
    return float(np.sum(mass_a * (below_b + 0.5 * (upto_b - below_b))))


def win_rate(
    candidate: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    procedure: str = "sample",
    n: int = 1,
    opponent: Literal["procedure", "sample"] = "procedure",
    draws: Literal["subsets", "replacement"] = "subsets",
    confidence: float = 0.95,
) -> WinRate:
    """Mean over prompts of `prompt_win_rate`; `candidate[i]` and `reference[i]` are prompt i's rewards.

    With one prompt there is no spread to measure between prompts: the interval is [0, 1].
    """
    if len(candidate) != len(reference):
        raise ValueError(f"win_rate needs the same prompts on both sides; got {len(candidate)} and {len(reference)}")
    if not candidate:
        raise ValueError("win_rate needs at least one prompt")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    per_prompt = np.array(
        [prompt_win_rate(a, b, procedure, n, opponent, draws) for a, b in zip(candidate, reference, strict=True)]
    )
    mean = float(per_prompt.mean())
    if per_prompt.size < 2:
        low, high = 0.0, 1.0
    else:
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        half = z * float(per_prompt.std(ddof=1)) / math.sqrt(per_prompt.size)
        low, high = max(0.0, mean - half), min(1.0, mean + half)
    per_prompt_values = tuple(float(w) for w in per_prompt)
    return WinRate(mean, low, high, int(per_prompt.size), procedure, n, opponent, draws, per_prompt_values)


@dataclass(frozen=True)
class KLEstimate:
    """KL(candidate || reference) in nats per sequence, by a named estimator, with its standard error."""

    estimator: str  # "k1" or "k3"
    per_sequence: float
    standard_error: float  # over prompts (over samples when there is one prompt; NaN for one sample)
    per_token: float  # summed over all tokens / number of tokens: the scale TRL logs as `kl`
    num_samples: int


KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")


def kl_estimate(
    candidate_logprobs: Sequence[Sequence[Sequence[float]]],
    reference_logprobs: Sequence[Sequence[Sequence[float]]],
    estimator: Literal["k1", "k3"] = "k1",
) -> KLEstimate:
    """KL of the candidate to the reference from `[prompt][sample][token]` log-probabilities.

    Both arguments hold the same tokens, the candidate's samples: their log-probabilities under
    the candidate (as sampled, at temperature 1) and under the reference (teacher-forced).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    if len(candidate_logprobs) != len(reference_logprobs) or not candidate_logprobs:
        raise ValueError(
            f"kl_estimate needs the same non-empty prompts on both sides; got {len(candidate_logprobs)} "
            f"and {len(reference_logprobs)}"
        )
    prompt_means, sample_values, total, tokens = [], [], 0.0, 0
    for i, (cand_samples, ref_samples) in enumerate(zip(candidate_logprobs, reference_logprobs, strict=True)):
        if len(cand_samples) != len(ref_samples) or not cand_samples:
            raise ValueError(f"prompt {i}: {len(cand_samples)} candidate and {len(ref_samples)} reference samples")
        values = []
        for j, (cand, ref) in enumerate(zip(cand_samples, ref_samples, strict=True)):
            if len(cand) != len(ref):
                raise ValueError(f"prompt {i}, sample {j}: {len(cand)} candidate and {len(ref)} reference log-probs")
            log_ratio = np.asarray(cand, dtype=np.float64) - np.asarray(ref, dtype=np.float64)  # log pi - log pi_ref
            terms = log_ratio if estimator == "k1" else np.expm1(-log_ratio) + log_ratio
            values.append(float(terms.sum()))
            total += float(terms.sum())
            tokens += log_ratio.size
        prompt_means.append(float(np.mean(values)))
        sample_values.extend(values)
    spread = prompt_means if len(prompt_means) > 1 else sample_values
    error = float(np.std(spread, ddof=1) / math.sqrt(len(spread))) if len(spread) > 1 else math.nan
    return KLEstimate(estimator, float(np.mean(prompt_means)), error, total / max(tokens, 1), len(sample_values))


def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-prompt values and its normal interval over prompts, clipped to [0, 1] ([0, 1] for one prompt)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return mean, 0.0, 1.0
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def summary_metrics(rows: Sequence[dict], confidence: float = 0.95) -> dict[str, float | int | bool | None]:
    """A run's win-rate and KL metrics from its records (workflow=win_rate, ctrl_align's evaluation).

    `win_rate` (the workflow's procedure) and each `win_rates` label give `win_rate[_label]` with
    `_ci_low` / `_ci_high` over prompts; per-prompt KL (`kl`: k1 and k3 per sequence) gives
    `kl_k1`, `kl_k3` (nats per sequence, mean over prompts), their standard errors, and `kl_per_token`.
    """
    out: dict[str, float | int | bool | None] = {}
    series: dict[str, list[float]] = {}
    for row in rows:
        if row.get("win_rate") is not None:
            series.setdefault("win_rate", []).append(row["win_rate"])
        for label, value in (row.get("win_rates") or {}).items():
            series.setdefault(f"win_rate_{label}", []).append(value)
    for name, values in series.items():
        mean, low, high = interval(values, confidence)
        out |= {name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high}
    if series:
        out["win_rate_prompts"] = max(len(v) for v in series.values())
    for name, key in (("mean_calibrated", "calibrated"), ("reference_mean_calibrated", "reference_calibrated")):
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            out[name] = float(np.mean(values))
    # only win_rate records carry `kl` as estimator dicts; guided decoding's `kl` is one float, summed per step
    kls = [row["kl"] for row in rows if isinstance(row.get("kl"), dict)]
    if kls:
        for name in KL_ESTIMATORS:
            values = np.array([kl[name] for kl in kls], dtype=np.float64)
            out[f"kl_{name}"] = float(values.mean())
            out[f"kl_{name}_se"] = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else None
        tokens = sum(kl["tokens"] for kl in kls)
        out["kl_per_token"] = float(sum(kl["k1"] * kl["samples"] for kl in kls) / max(tokens, 1))
        out["kl_exact"] = all(kl.get("exact", True) for kl in kls)
    return out
