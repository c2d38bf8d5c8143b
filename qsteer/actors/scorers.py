"""Scorers of the token-wise guided loop that call other roles: Transfer Q* (baseline rollouts) and ARGS.

`decoding.guided` asks a `TokenScorer` once per step for the scores of every running row's top-k
candidates and samples p(z|s) exp(alpha score) over them. These scorers run inside the actor
that runs the loop (the policy's, or the baseline's when the baseline gives the logits) and
reach the other roles through their groups, which cross into that actor as Ray handles:

- `TransferQStarScorer`: for all rows x k candidates of a step, m rollouts of L tokens from the
  baseline in ONE baseline call (keys per row, step and candidate, so rollouts are reproducible
  and independent of batching; the engine prefills each context once for its m rows), their
  texts in ONE reward call (and one baseline-reward call for indirect transfer), then Q* by
  `values.transfer_qstar`. The reference code rolls out one prompt's k candidates per call and
  runs prompts one at a time (benchmarks/bench_tqstar.py measures the difference).
- `ArgsScorer`: the reward of the partial text [s, z] for every candidate, in ONE reward call.

Text crosses to the reward, never token ids of one model into another: the texts are decoded by
the model that produced the tokens (the policy's tokenizer; a baseline must share it). Each
scorer counts what it spends per row (rows of one call share its calls; tokens are exact) and
hands it back through `row_stats`, which the policy adds to each completion's `guided` record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qsteer.actors.roles import PolicyRole, RewardRole
from qsteer.engines import SamplingParams
from qsteer.values.transfer_qstar import transfer_q


@dataclass
class PromptInfo:
    """What a scorer needs of a row's prompt: where its completion starts, and the reward's inputs."""

    length: int  # prompt tokens: the completion starts here in every context
    text: str  # the prompt as the reward sees it
    columns: dict[str, Any] = field(default_factory=dict)  # the record's other fields, for the reward


def _rewards(reward: RewardRole, infos: list[PromptInfo], texts: list[str], ids: list[list[int]] | None
             ) -> list[float]:
    names = sorted({name for info in infos for name in info.columns})
    columns = {name: [info.columns.get(name) for info in infos] for name in names}
    scored = reward.score([info.text for info in infos], texts, ids, columns)
    out = []
    for text, (value, info) in zip(texts, scored, strict=True):
        if value is None:  # a guided step cannot skip a candidate's score; the record gets this error
            raise ValueError(f"the reward failed on a partial text ({info.get('error', 'returned None')}): "
                             f"{text[-80:]!r}")
        out.append(float(value))
    return out


class _RowCosts:
    """Per (prompt key, sample index): calls shared with the other rows of a call, and exact tokens."""

    def __init__(self) -> None:
        self.costs: dict[tuple[str, int], dict[str, float]] = {}

    def share(self, rows: list[tuple[str, int]], **counts: float) -> None:
        for row in rows:
            self.add(row, **{name: count / len(rows) for name, count in counts.items()})

    def add(self, row: tuple[str, int], **counts: float) -> None:
        costs = self.costs.setdefault(row, {})
        for name, count in counts.items():
            costs[name] = costs.get(name, 0.0) + count

    def row_stats(self, key: str, index: int) -> dict[str, float]:
        return {name: round(value, 6) for name, value in self.costs.get((key, index), {}).items()}


class TransferQStarScorer(_RowCosts):
    """Q*(s, z) of every candidate from baseline rollouts (spec 3.3 steps 3-5)."""

    uses_hidden = False

    def __init__(self, prompts: dict[str, PromptInfo], reward: RewardRole, baseline: PolicyRole | None = None,
                 baseline_reward: RewardRole | None = None, *, rollout_tokens: int, rollouts: int,
                 rollout_sampling: str, transfer: str, estimator: str, beta: float, seed: int) -> None:
        super().__init__()
        if transfer == "indirect" and baseline_reward is None:
            raise ValueError("indirect transfer needs the baseline's reward group (baseline.reward)")
        self.prompts, self.reward, self.baseline, self.baseline_reward = prompts, reward, baseline, baseline_reward
        self.transfer, self.estimator, self.beta = transfer, estimator, beta
        self.params = SamplingParams(n=rollouts, max_new_tokens=rollout_tokens,
                                     temperature=0.0 if rollout_sampling == "greedy" else 1.0, seed=seed)
        self.local: Any = None

    def bind(self, policy: Any) -> None:
        """The loop's own model: rollouts go to it when no baseline group is given (logit_model=baseline)."""
        self.local = policy

    def score(self, step: Any) -> torch.Tensor:
        rows, k, m = len(step.contexts), step.candidates.shape[1], self.params.n
        candidates = step.candidates.tolist()
        infos = [self.prompts[key] for key, _ in step.rows]
        contexts, starts, keys = [], [], []
        for (key, index), context, info, tokens in zip(step.rows, step.contexts, infos, candidates, strict=True):
            for z in tokens:
                contexts.append(context + [z])
                starts.append(info.length)
                keys.append(f"{key}/{index}/t{step.step}/z{z}")  # the rollouts' own streams
        source = self.baseline if self.baseline is not None else self.local
        out = source.rollouts(contexts, starts, self.params, keys)
        texts = [r.text for group in out for r in group]
        ids = [context[start:] + r.token_ids for context, start, group in zip(contexts, starts, out, strict=True)
               for r in group]
        flat_infos = [info for info in infos for _ in range(k * m)]
        rewards = torch.tensor(_rewards(self.reward, flat_infos, texts, ids), dtype=torch.float64).view(rows, k, m)
        baseline_rewards = None
        if self.transfer == "indirect":
            baseline_rewards = torch.tensor(_rewards(self.baseline_reward, flat_infos, texts, ids),
                                            dtype=torch.float64).view(rows, k, m)
        reward_calls = 2 if self.transfer == "indirect" else 1
        self.share(step.rows, baseline_calls=1, reward_calls=reward_calls)
        for r, row in enumerate(step.rows):
            group = out[r * k : (r + 1) * k]
            self.add(row, rollout_tokens=sum(len(x.token_ids) for g in group for x in g),
                     rollouts=k * m, rewarded_texts=k * m * reward_calls)
        return transfer_q(rewards, self.transfer, self.estimator, self.beta, baseline_rewards)


class ArgsScorer(_RowCosts):
    """r([s, z]): the reward of each candidate's partial text (ARGS, spec 8.1)."""

    uses_hidden = False

    def __init__(self, prompts: dict[str, PromptInfo], reward: RewardRole) -> None:
        super().__init__()
        self.prompts, self.reward = prompts, reward
        self.local: Any = None

    def bind(self, policy: Any) -> None:
        self.local = policy  # decodes the partial texts with the loop's own tokenizer

    def score(self, step: Any) -> torch.Tensor:
        rows, k = step.candidates.shape
        infos, ids = [], []
        for (key, _), context, tokens in zip(step.rows, step.contexts, step.candidates.tolist(), strict=True):
            info = self.prompts[key]
            for z in tokens:
                infos.append(info)
                ids.append(context[info.length:] + [z])
        texts = self.local.decode(ids)
        rewards = _rewards(self.reward, infos, texts, ids)
        self.share(step.rows, reward_calls=1)
        for row in step.rows:
            self.add(row, rewarded_texts=k)
        return torch.tensor(rewards, dtype=torch.float64).view(rows, k)
