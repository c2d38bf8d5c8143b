"""Draft chains sampled from a draft distribution q: shared by the model and layer-skip drafters.

One chain of `gamma` tokens per row, or `num_drafts` of them verified together (SpecTr's K-SEQ
for i.i.d. chains, RSD's recursive rejection for first tokens drawn without replacement), and
SpecDec++'s adaptive length: stop a row's chain once P(some drafted token is rejected) passes
`threshold`, with that probability from an `AcceptancePredictor` learned online.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from qsteer.decoding.drafters.base import Draft, DraftConfig, Rows, config_error
from qsteer.lm.forward import forward_chunk
from qsteer.lm.sampling import SamplingParams, draw, processed, row_generator


@dataclass(frozen=True)
class ChainConfig(DraftConfig):
    """Fields of the drafters that sample chains from a distribution (model, layerskip)."""

    gamma: int = 4
    """Draft tokens per round (the most, when adaptive)."""
    num_drafts: int = 1
    """Draft chains per round; more than 1 verifies them together by `verify`."""
    verify: Literal["auto", "rrs", "kseq"] = "auto"
    """Several drafts: rrs (RSD, first tokens drawn without replacement; auto picks it) or kseq (SpecTr, i.i.d.)."""
    adaptive: bool = False
    """SpecDec++: stop a row's chain once P(some draft token is rejected) exceeds `threshold`."""
    threshold: float = 0.3
    """The adaptive stopping threshold, in (0, 1]."""
    min_gamma: int = 2
    """Adaptive: draft at least this many tokens per round."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.verify not in ("auto", "rrs", "kseq"):
            raise config_error("verify", f"{self.verify!r} is not one of auto, rrs, kseq")
        if self.gamma < 1:
            raise config_error("gamma", f"must be at least 1, got {self.gamma}")
        if self.num_drafts < 1:
            raise config_error("num_drafts", f"must be at least 1, got {self.num_drafts}")
        if self.adaptive and not 0 < self.threshold <= 1:
            raise config_error("threshold", f"must be in (0, 1], got {self.threshold}")
        if self.adaptive and self.num_drafts > 1:
            raise config_error("adaptive", "adaptive draft length is for one draft chain (num_drafts: 1)")

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def rule(self) -> str:
        """The verification rule of the speculative loop for these drafts."""
        return "kseq" if self.verify == "kseq" else "rrs"


class AcceptancePredictor:
    """P(a draft token is accepted) as a function of the draft's own probability for it, learned online.

    SpecDec++ trains a head on the draft's hidden state for this; here the predictor is a
    calibration table over q(token) (10 bins), started at acceptance = q (DySpec's observation
    that acceptance tracks draft probability) and updated with the soft labels
    min(1, p/q) that every verification yields for free.
    """

    def __init__(self, bins: int = 10) -> None:
        self.bins = bins
        self.total = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins  # one pseudo-observation per bin
        self.count = torch.ones(bins, dtype=torch.float64)

    def _bin(self, q_token: torch.Tensor) -> torch.Tensor:
        return (q_token.double() * self.bins).long().clamp(0, self.bins - 1)

    def predict(self, q_token: torch.Tensor) -> torch.Tensor:
        b = self._bin(q_token)
        return (self.total[b] / self.count[b]).to(q_token.dtype)

    def update(self, q_token: torch.Tensor, soft_label: torch.Tensor) -> None:
        b = self._bin(q_token)
        self.total.index_add_(0, b, soft_label.double())
        self.count.index_add_(0, b, torch.ones_like(soft_label, dtype=torch.float64))


def row_generators(batch: Rows, salt: str) -> list[torch.Generator]:
    """A drafter's own random stream per row, apart from the verifier's (same seed and key, salted)."""
    return [row_generator(batch.params.seed, f"{key}/{salt}", j) for key, j in batch.keys]


def _first_tokens(q0: torch.Tensor, k: int, without_replacement: bool, greedy: bool, rng: torch.Generator) -> list[int]:
    if greedy:
        return q0.topk(k).indices.tolist() if without_replacement else [int(q0.argmax())] * k
    if without_replacement:  # Gumbel-top-k: the order of the perturbed scores is the sampling order
        gumbel = -torch.log(-torch.log(torch.rand(q0.shape, generator=rng, dtype=torch.float64).clamp_min(1e-300)))
        return (q0.double().log() + gumbel).topk(k).indices.tolist()
    return [draw(q0, float(torch.rand((), generator=rng, dtype=torch.float64))) for _ in range(k)]


def sample_chains(
    start_logits: torch.Tensor,  # [rows, vocab]: the draft's logits for the first draft token
    step: Callable[[int, torch.Tensor], torch.Tensor],  # (t, inputs [rows, k]) -> logits [rows, k, vocab]
    cfg: ChainConfig,
    params: SamplingParams,
    rngs: list[torch.Generator],
    predictor: AcceptancePredictor | None = None,
) -> Draft:
    rows, k, gamma = start_logits.shape[0], cfg.num_drafts, cfg.gamma
    greedy = params.temperature == 0
    without_replacement = k > 1 and cfg.verify != "kseq"
    q0 = processed(start_logits, params)
    tokens = torch.zeros((rows, k, gamma), dtype=torch.long)
    qs = torch.zeros((rows, k, gamma, q0.shape[-1]))
    valid = torch.ones((rows, k, gamma), dtype=torch.bool)
    q0_host = q0.cpu()  # the rows' generators live on the host
    tokens[:, :, 0] = torch.tensor([_first_tokens(q0_host[r], k, without_replacement, greedy, rngs[r])
                                    for r in range(rows)])
    qs[:, :, 0] = q0_host[:, None]
    confidence = torch.ones(rows)  # SpecDec++: P(every token drafted so far is accepted)
    calls = 0
    for t in range(1, gamma):
        if predictor is not None:
            drafted_q = qs[:, 0, t - 1].gather(-1, tokens[:, 0, t - 1, None])[:, 0]
            confidence *= predictor.predict(drafted_q)
            stop = (1 - confidence > cfg.threshold) & (t >= cfg.min_gamma)
            valid[:, :, t:] &= ~stop[:, None, None] & valid[:, :, t - 1 : t]
            if not valid[:, :, t].any():
                break
        logits = step(t, tokens[:, :, t - 1].to(start_logits.device))
        calls += 1
        q = processed(logits, params).cpu()
        qs[:, :, t] = q
        if greedy:
            tokens[:, :, t] = q.argmax(-1)
        else:
            u = torch.stack([torch.rand(k, generator=rng, dtype=torch.float64) for rng in rngs])
            cdf = q.double().cumsum(-1)
            tokens[:, :, t] = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True)[..., 0].clamp(
                max=q.shape[-1] - 1)
    parents = [-1 if t == 0 else c * gamma + t - 1 for c in range(k) for t in range(gamma)]
    return Draft(tokens.reshape(rows, k * gamma), parents, valid.reshape(rows, k * gamma),
                 qs.reshape(rows, k * gamma, -1), without_replacement, calls)


def soft_labels(draft: Draft, logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(token), min(1, p/q)) for every valid drafted token: what the acceptance predictor learns from."""
    parent_cols = torch.tensor([p + 1 for p in draft.parents])
    p_tgt = processed(logits[:, parent_cols].cpu(), params)
    p_tok = p_tgt.gather(-1, draft.tokens[..., None])[..., 0]
    q_tok = draft.q.gather(-1, draft.tokens[..., None])[..., 0]
    soft = torch.where(q_tok > 0, (p_tok / q_tok.clamp_min(1e-30)).clamp(max=1), torch.ones_like(q_tok))
    return q_tok[draft.valid], soft[draft.valid]


def draft_steps(model, cache, valid: torch.Tensor, base_pos: torch.Tensor, k: int,
                context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """The `step` of sample_chains on a cache whose first valid.shape[1] columns are the prefix;
    `context` wraps each forward (layer skipping runs it with sub-blocks skipped)."""
    rows, prefix = valid.shape

    def step(t: int, inputs: torch.Tensor) -> torch.Tensor:
        own = torch.eye(k, dtype=torch.bool, device=valid.device)
        earlier = own.repeat(1, t - 1)  # columns appended by steps 1..t-1, k per step
        seen = torch.cat([valid[:, None, :].expand(rows, k, prefix), earlier.expand(rows, k, -1)], dim=-1)
        positions = (base_pos + t)[:, None].expand(rows, k)
        with context():
            return forward_chunk(model, cache, seen, inputs, positions, own)

    return step
