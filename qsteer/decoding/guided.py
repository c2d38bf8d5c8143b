"""Token-wise guided decoding: at every step, sample from p(z|s) exp(alpha * score(s, z)) / Z over the policy's top-k.

This is the loop of tokenwise controlled decoding (Mudgal et al., 2023, Theorem 2.1: the score
is a value V([s, z]) of the base policy), and the same loop serves every method of that shape,
which differ only in where the per-candidate score comes from:

- CD with a Q-head on the policy's backbone (`PolicyHeadScorer`): the values come from the
  hidden state of the very forward that gives the logits, so a token costs about one forward;
- CD with any other value, in process or in value actors (`ValueFunctionScorer` over a
  `qsteer.values.ValueFunction`: token ids in, floats out; one call per step for all rows);
- Transfer Q* (alpha * Q*(s, z) estimated from a baseline model's rollouts) and ARGS
  (w * reward(s + z) of the partial text) plug in as their own `TokenScorer`: `score(step)`
  gets every running row's context, its top-k candidates and their base log-probs, the row's
  (prompt key, sample index) for seeding its own rollouts, and the step index; it returns a
  [rows, k] tensor. ARGS-greedy is temperature 0 here (argmax of log p + alpha * score), its
  stochastic form is temperature 1 with alpha = w (the law is a softmax of log p + w r,
  section 0.3: log-probs and raw logits give the same law);
- several scorers with weights (`WeightedScorers`): the paper's multi-objective form.

Read top to bottom (`generate_rows`): rows are decoded in chunks of `max_batch_rows`; each chunk
prefills each prompt once and copies its cache to the prompt's rows, then every step takes the
top-k of the base law (at the sampling temperature), asks the scorer once for all running rows,
draws each row's token with `qsteer.values.guided.sample_guided` at the row's own uniform for
that step (the plain loop's streams: `lm.sampling.step_uniforms`), adds the step's exact
KL(pi_alpha || p_k) to the row, applies the shared stop rule (`lm.stop`) and runs one forward.
The forward is the backbone and then the LM head, so the last hidden state is at hand for a
scorer that reads it, at no extra cost.

Because the candidates, uniforms and CDF order are the plain loop's, alpha = 0 draws exactly
the tokens of plain top-k sampling with the same seed (top_k = 0, the whole vocabulary: plain
sampling), up to floating-point rounding (bitwise in float64; tests/test_guided.py).

Each completion carries `guided`: `kl` (sum over its steps of the exact KL from the top-k base
p_k, the law alpha = 0 samples), `kl_full` (the same from the unrestricted base at the sampling
temperature: adds -log of the top-k mass), `scored_candidates` (k per step), and its share of
its chunk's scorer calls and policy forwards (`scorer_calls`, `policy_forwards`: summed over a
chunk's rows they give the chunk's counts exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from qsteer.lm.cache import new_cache
from qsteer.lm.forward import left_pad
from qsteer.lm.loading import LanguageModel
from qsteer.lm.sampling import SamplingParams, step_uniforms
from qsteer.lm.stop import Completion
from qsteer.values.base import ValueFunction
from qsteer.values.guided import sample_guided, step_kl


@dataclass
class GuidedStep:
    """What a scorer sees at one step: the running rows and their candidate next tokens."""

    contexts: list[list[int]]  # per running row: prompt ids, then the tokens generated so far
    candidates: torch.Tensor  # [rows, k] token ids, the base's top-k
    logprobs: torch.Tensor  # [rows, k] their base log-probs at the sampling temperature
    hidden: torch.Tensor | None  # [rows, hidden] the policy's last hidden state (scorer.uses_hidden only)
    rows: list[tuple[str, int]]  # per running row: (prompt key, sample index), to seed a scorer's own draws
    step: int  # tokens generated so far by every running row (rows of a chunk start together)


@runtime_checkable
class TokenScorer(Protocol):
    """Per-candidate scores for the top-k of each running row: score(s, z), in the law's exp(alpha * score)."""

    uses_hidden: bool
    """True when `score` reads `step.hidden` (a head on the policy's own hidden states)."""

    def score(self, step: GuidedStep) -> torch.Tensor:
        """[rows, k] scores, row i for `step.candidates[i]`; finite numbers."""
        ...


class ValueFunctionScorer:
    """Any `ValueFunction` (token-id lists in, floats out) as a scorer: V([s, z]) for each candidate z.

    One `next_values` call per step covers every running row, so a value in Ray actors costs one
    round trip per token. A Q-head answers from one forward over each prefix, a scalar head
    scores the k extended prefixes.
    """

    uses_hidden = False

    def __init__(self, value: ValueFunction) -> None:
        self.value = value

    def score(self, step: GuidedStep) -> torch.Tensor:
        out = self.value.next_values(step.contexts, step.candidates.tolist())
        return torch.tensor(out, dtype=torch.float64)


class PolicyHeadScorer:
    """A Q-head on the policy's last hidden state: Q(s)[z] = W[z] . h_s + b[z], from the loop's own forward.

    Only the k candidate rows of the head are computed. A scalar head on the policy needs the
    hidden state after each candidate (k more forwards): use `ValueFunctionScorer` for that.
    """

    uses_hidden = True

    def __init__(self, head: nn.Linear) -> None:
        if head.out_features == 1:
            raise ValueError("a scalar head on the policy scores [s, z] only after a forward over z: "
                             "wrap its ValueModel in ValueFunctionScorer(ValueScorer(...)) instead")
        self.head = head

    def score(self, step: GuidedStep) -> torch.Tensor:
        if step.hidden is None:
            raise ValueError("PolicyHeadScorer needs the policy's hidden states (uses_hidden)")
        weight = self.head.weight[step.candidates]  # [rows, k, hidden]
        out = (weight * step.hidden[:, None, :].to(weight.dtype)).sum(-1)
        if self.head.bias is not None:
            out = out + self.head.bias[step.candidates]
        return out.double()


class WeightedScorers:
    """sum_i w_i score_i: several objectives at once (CD's multi-objective form), no retraining."""

    def __init__(self, parts: Sequence[tuple[TokenScorer, float]]) -> None:
        if not parts:
            raise ValueError("WeightedScorers needs at least one scorer")
        self.parts = [(scorer, float(weight)) for scorer, weight in parts]
        self.uses_hidden = any(scorer.uses_hidden for scorer, _ in self.parts)

    def score(self, step: GuidedStep) -> torch.Tensor:
        total = None
        for scorer, weight in self.parts:
            part = weight * scorer.score(step).double().cpu()
            total = part if total is None else total + part
        return total


@torch.inference_mode()
def generate_rows(lm: LanguageModel, prompt_ids: list[list[int]], keys: list[str], rows: list[tuple[int, int]],
                  params: SamplingParams, scorer: TokenScorer, alpha: float, max_batch_rows: int
                  ) -> list[Completion]:
    """Decode `rows` ((prompt index, sample index) pairs) under the guided law, `max_batch_rows` at a time.

    `params.top_k` is the candidate count k (0: the whole vocabulary); `params.temperature`
    tempers the base law (0: the argmax of log p + alpha * score, ARGS-greedy's rule).
    """
    if params.top_p < 1.0:
        raise ValueError(f"guided decoding samples over the top-k; top_p={params.top_p} is not supported "
                         "(set generation.top_p=1)")
    if params.speculative:
        raise ValueError("guided decoding does not decode speculatively (set generation.speculative=false)")
    out: list[Completion] = []
    for start in range(0, len(rows), max_batch_rows):
        out += _Chunk(lm, prompt_ids, keys, rows[start : start + max_batch_rows], params, scorer, alpha).run()
    return out


class _Chunk:
    def __init__(self, lm, prompt_ids, keys, rows, params, scorer, alpha) -> None:
        self.lm, self.device = lm, lm.device
        self.backbone, self.head = lm.model.base_model, lm.model.get_output_embeddings()
        self.prompt_ids, self.keys, self.rows, self.params = prompt_ids, keys, rows, params
        self.scorer, self.alpha = scorer, float(alpha)
        vocab = lm.model.config.vocab_size
        self.k = vocab if not params.top_k else min(params.top_k, vocab)
        self.steps = params.max_new_tokens
        self.stop = lm.stop_rule(params.stop)
        self.budget = [lm.budget(len(prompt_ids[p]), params.max_new_tokens) for p, _ in rows]
        self.outputs: list[list[int]] = [[] for _ in rows]
        self.logprobs: list[list[float]] = [[] for _ in rows]
        self.kl = [0.0] * len(rows)
        self.kl_full = [0.0] * len(rows)
        self.finish = ["length"] * len(rows)
        self.scorer_calls = 0
        self.forwards = 0

    def run(self) -> list[Completion]:
        self.prefill()
        while True:
            chosen = self.sample()
            if not any(self.running):
                break
            if self.running.count(False) * 4 >= len(self.running):
                chosen = self.shrink(chosen)
            self.forward(chosen)
        share = len(self.rows)
        out = []
        for row, (output, logprobs, finish) in enumerate(zip(self.outputs, self.logprobs, self.finish, strict=True)):
            completion = self.stop.completion(output, logprobs, finish)
            completion.guided = {"kl": self.kl[row], "kl_full": self.kl_full[row],
                                 "scored_candidates": len(output) * self.k,
                                 "scorer_calls": self.scorer_calls / share, "policy_forwards": self.forwards / share}
            out.append(completion)
        return out

    # -- prefill: each prompt once, its cache copied to its rows ----------------------------------
    def prefill(self) -> None:
        prompts = sorted({p for p, _ in self.rows})
        slot = {p: i for i, p in enumerate(prompts)}
        ids, mask, positions = left_pad([self.prompt_ids[p] for p in prompts], self.lm.pad_id, self.device)
        self.cache = new_cache(self.lm.model, ids.shape[1] + self.steps)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=self.cache).last_hidden_state[:, -1:]
        logits = self.head(hidden)[:, -1].float()  # the plain loop's prefill logits, same shapes
        self.forwards += 1
        expand = torch.tensor([slot[p] for p, _ in self.rows], device=self.device)
        self.cache.reorder_cache(expand)
        self.logits, self.hidden = logits[expand], hidden[expand, -1]
        self.mask, self.position = mask[expand], positions[expand][:, -1]
        self.slot_row = list(range(len(self.rows)))
        self.running = [True] * len(self.rows)
        self.count = 0
        self.uniforms = torch.stack([step_uniforms(self.params.seed, self.keys[p], j, self.steps, self.params.offset)
                                     for p, j in self.rows]).to(self.device)

    # -- one step: candidates, scores, draws, KL, stop rule ---------------------------------------
    def sample(self) -> torch.Tensor:
        live = [slot for slot, running in enumerate(self.running) if running]
        index = torch.tensor(live, device=self.device)
        raw = torch.log_softmax(self.logits[index], dim=-1)  # temperature 1: what `logprobs` report
        temperature = self.params.temperature
        base = raw if temperature in (0, 1) else torch.log_softmax(self.logits[index] / temperature, dim=-1)
        top_lp, top_ids = base.topk(self.k, dim=-1)
        rows = [self.slot_row[slot] for slot in live]
        step = GuidedStep(
            contexts=[self.prompt_ids[self.rows[r][0]] + self.outputs[r] for r in rows],
            candidates=top_ids, logprobs=top_lp,
            hidden=self.hidden[index] if self.scorer.uses_hidden else None,
            rows=[(self.keys[self.rows[r][0]], self.rows[r][1]) for r in rows], step=self.count,
        )
        values = self.scorer.score(step)
        self.scorer_calls += 1
        values = torch.as_tensor(values).to(device=self.device, dtype=top_lp.dtype)
        if values.shape != top_lp.shape:
            raise ValueError(f"the scorer returned scores of shape {tuple(values.shape)} for candidates "
                             f"{tuple(top_lp.shape)}")
        if not torch.isfinite(values).all():
            raise ValueError(f"the scorer returned a non-finite score at step {self.count}")
        if temperature == 0:
            best = (top_lp + self.alpha * values).argmax(-1, keepdim=True)
            tokens = top_ids.gather(-1, best)[:, 0]
        else:
            column = min(self.count, self.steps - 1)
            tokens = sample_guided(top_ids, top_lp, values, self.alpha, self.uniforms[index, column])
        kl = step_kl(top_lp, values, self.alpha).tolist()
        kl_full = step_kl(top_lp, values, self.alpha, full_base=True).tolist()
        token_logprobs = raw.gather(-1, tokens[:, None])[:, 0].tolist()
        chosen = torch.full((len(self.running),), self.lm.pad_id, dtype=torch.long, device=self.device)
        chosen[index] = tokens
        for i, (slot, row) in enumerate(zip(live, rows, strict=True)):
            self.outputs[row].append(int(tokens[i]))
            self.logprobs[row].append(token_logprobs[i])
            self.kl[row] += kl[i]
            self.kl_full[row] += kl_full[i]
            reason = self.stop.reason(self.outputs[row], self.budget[row])
            if reason is not None:
                self.finish[row] = reason
                self.running[slot] = False
        self.count += 1
        return chosen

    def shrink(self, chosen: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the batch once a quarter has finished (a cache copy costs a few steps)."""
        keep = [slot for slot, running in enumerate(self.running) if running]
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.position = self.mask[index], self.position[index]
        self.uniforms = self.uniforms[index]
        self.slot_row = [self.slot_row[slot] for slot in keep]
        self.running = [True] * len(keep)
        return chosen[index]

    def forward(self, chosen: torch.Tensor) -> None:
        """Feed the chosen tokens: the backbone, then the head, so the hidden state is there for the scorer."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        self.position = self.position + 1
        hidden = self.backbone(input_ids=chosen[:, None], attention_mask=self.mask,
                               position_ids=self.position[:, None], past_key_values=self.cache).last_hidden_state
        self.forwards += 1
        self.logits = self.head(hidden)[:, -1].float()
        self.hidden = hidden[:, -1]
