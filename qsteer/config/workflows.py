"""One config dataclass per workflow (`workflow=<name>`); a workflow's own rules live in its `check`.

`WORKFLOW_CONFIGS` maps `workflow.name` to its dataclass. The workflows themselves (in
`qsteer.workflows`) read these by attribute: `ctx.workflow.n`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from qsteer.config.base import Config, Invalid, Range


@dataclass(frozen=True)
class WorkflowConfig(Config):
    """Base of the workflow configs: `name` selects the workflow."""

    name: str = ""
    """The workflow."""


@dataclass(frozen=True)
class BestOfNConfig(WorkflowConfig):
    """Best-of-N: sample `n` completions per prompt, score each with the reward, keep one."""

    name: Literal["best_of_n"] = "best_of_n"
    """Best-of-N."""
    n: Annotated[int, Range(1)] = 4
    """Candidates sampled per prompt."""
    aggregate: Literal["max", "weighted", "majority"] = "max"
    """`max`: the candidate with the highest reward; `weighted`: the answer with the largest reward
    sum (weighted Best-of-N); `majority`: the most frequent answer (self-consistency)."""
    answer_pattern: str | None = None
    """A regex extracting the answer for weighted/majority (its last match, group 1 if it has one);
    null: the last `\\boxed{}`, else the last number."""

    def check(self) -> None:
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as err:
                raise Invalid("answer_pattern", f"is not a valid regex: {err}") from err


@dataclass(frozen=True)
class SampleConfig(WorkflowConfig):
    """Plain sampling, the baseline: `n` samples per prompt, the first is the output."""

    name: Literal["sample"] = "sample"
    """Plain sampling."""
    n: Annotated[int, Range(1)] = 1
    """Samples per prompt, all scored; the first is the output."""


@dataclass(frozen=True)
class ScoreConfig(WorkflowConfig):
    """Score given completions without generating: dataset records need `prompt` and `completion`."""

    name: Literal["score"] = "score"
    """Scoring only."""


@dataclass(frozen=True)
class SpeculativeWorkflowConfig(WorkflowConfig):
    """Speculative decoding with the `draft=` group, and plain decoding beside it for the speedup."""

    name: Literal["speculative"] = "speculative"
    """Speculative decoding."""
    n: Annotated[int, Range(1)] = 1
    """Samples per prompt, all decoded speculatively; the first is the output."""
    baseline: bool = True
    """Also decode plainly in the same run: the speedup, and (at temperature 0) token identity."""


@dataclass(frozen=True)
class ControlledDecodingConfig(WorkflowConfig):
    """Controlled decoding (Mudgal et al., 2023): steer the frozen policy by the `value=` group's value.

    `tokenwise` samples each token from p(z|s) exp(alpha V([s, z])) / Z over the policy's top-k
    (hf engine only); `blockwise` samples `n` blocks of `block_size` tokens from the policy, keeps the
    one with the highest value and repeats. Records carry the KL from the policy (exact for tokenwise,
    the Best-of-K bound per block for blockwise) and the calls and tokens of each role."""

    name: Literal["controlled_decoding"] = "controlled_decoding"
    """Controlled decoding."""
    mode: Literal["tokenwise", "blockwise"] = "tokenwise"
    """`tokenwise`: guide every token by the value; `blockwise`: best of `n` blocks by the value."""
    alpha: Annotated[float, Range(0)] = 1.0
    """tokenwise: the strength lambda of the law p exp(alpha V)/Z; 0 is the policy's own top-k sampling."""
    top_k: Annotated[int, Range(0)] = 20
    """tokenwise: the candidate tokens per step, the policy's k most likely; 0: the whole vocabulary."""
    n: Annotated[int, Range(1)] = 4
    """blockwise: K, candidate blocks sampled per step; 1 is plain sampling."""
    block_size: Annotated[int, Range(1)] = 8
    """blockwise: M, tokens per block; M >= generation.max_new_tokens with the reward as the value is
    Best of K."""
    score_finished: bool = False
    """blockwise: score a candidate that ended (EOS, stop string) with the reward instead of the value
    (the spec's option); with M >= the budget every candidate is finished, and this is Best of K."""


@dataclass(frozen=True)
class TrainValueConfig(WorkflowConfig):
    """Fit the `value=` group's value (value.method: CD-FUDGE or CD-Q) on policy samples scored by the reward.

    Samples `value.samples_per_prompt` completions per prompt from the policy actors, scores them with
    the reward actors, fits the value and writes RUN_DIR/value: the checkpoint, `value_card.json`,
    `README.md` and `loss_curve.png` (data size, loss, held-out correlation with the reward).
    `value.path=RUN_DIR/value` then loads it."""

    name: Literal["train_value"] = "train_value"
    """Value training."""


@dataclass(frozen=True)
class StepSearchConfig(WorkflowConfig):
    """Keys shared by the step-level searches (beam_search, dvts)."""

    n: Annotated[int, Range(1)] = 4
    """Candidate steps sampled per prompt at each step: the per-step budget, as Best-of-N's n."""
    beam_width: Annotated[int, Range(1)] = 2
    """Candidates sampled from each kept beam per step (search-and-learn's beam_width); `n` must be a
    multiple of it."""
    block_size: Annotated[int, Range(1)] = 16
    """A step ends after this many tokens at most (or earlier, at `delimiter` or EOS)."""
    delimiter: str = "\n\n"
    """A step ends once this string appears (search-and-learn's blank line); empty: steps end only
    after `block_size` tokens or at EOS."""
    scorer: Literal["reward", "value"] = "reward"
    """What ranks the partial answers and picks the output: `reward`, the reward group on the text so far
    (reward=model, or any reward that takes a partial text); `value`, the `value=` group on the prompt's
    and the beam's token ids (value.path, as controlled decoding), the reward then only scoring the
    finished beams for the records."""

    def check(self) -> None:
        if self.n % self.beam_width:
            raise Invalid("n", f"must be a multiple of workflow.beam_width ({self.beam_width}), got {self.n}")


@dataclass(frozen=True)
class BeamSearchConfig(StepSearchConfig):
    """Step-level beam search: each step, `n` candidates from the kept beams, the best `n / beam_width` kept."""

    name: Literal["beam_search"] = "beam_search"
    """Beam search over steps."""


@dataclass(frozen=True)
class DVTSConfig(StepSearchConfig):
    """Diverse verifier tree search: `n / beam_width` independent subtrees, each keeping its best beam."""

    name: Literal["dvts"] = "dvts"
    """DVTS over steps."""


@dataclass(frozen=True)
class CodeSearchConfig(WorkflowConfig):
    """What the code workflows share: the diversity measures reported beside pass@k."""

    vendi: bool = True
    """Report `metrics.vendi`, the mean per-problem Vendi score of the candidates' code (cosine kernel of
    all-MiniLM-L6-v2 embeddings; the orchestrator loads that 90 MB model for the summary)."""
    idea_diversity: bool = False
    """Report `metrics.idea_diversity`, PlanSearch's idea-level diversity: the policy back-translates each
    program into its idea and judges every pair "same idea?" at temperature 0 (costs 1 + (m - 1) / 2
    generations per program for m programs; the judge's tokens are kept apart from the method's)."""
    idea_diversity_codes: Annotated[int, Range(2)] = 25
    """Programs per problem the idea judge considers (a seeded shuffle's first ones; the reference's 25)."""


@dataclass(frozen=True)
class RepeatedSamplingConfig(CodeSearchConfig):
    """Repeated sampling for code: `n` programs per problem, asked for directly (PlanSearch's baseline)."""

    name: Literal["repeated_sampling"] = "repeated_sampling"
    """Code directly, `n` times."""
    n: Annotated[int, Range(1)] = 8
    """Programs per problem; each is run against the public tests (selection) and the hidden ones (scoring)."""


@dataclass(frozen=True)
class IdeaSearchConfig(CodeSearchConfig):
    """IdeaSearch: a plain-language sketch, then a program from it, `n` times per problem."""

    name: Literal["ideasearch"] = "ideasearch"
    """A sketch, then code, `n` times."""
    n: Annotated[int, Range(1)] = 8
    """Programs per problem (one sketch each)."""


@dataclass(frozen=True)
class PlanSearchConfig(CodeSearchConfig):
    """PlanSearch (Wang et al., 2024): observations, their subsets, sketches, fixes, pseudocode, code."""

    name: Literal["plansearch"] = "plansearch"
    """Plan search over natural-language observations."""
    n: Annotated[int, Range(1)] = 8
    """Programs per problem, drawn from the observation tree's code slots (round again when n exceeds them)."""
    num_observations: Annotated[int, Range(1)] = 10
    """Observations asked for at each expanded node."""
    max_subset: Annotated[int, Range(0)] = 2
    """Largest observation subset a child node is given (subsets of size 0..max_subset)."""
    layers: Annotated[int, Range(1, 2)] = 2
    """Observation layers: 1 (first-order only) or 2 (also second-order, from each subset)."""
    without_fix_idea: bool = False
    """Ablation: no critique-and-fix step (one code slot per tuple instead of two)."""
    without_pseudocode: bool = False
    """Ablation: code straight from the sketch."""
    without_idea: bool = False
    """Ablation: code straight from the observations (no sketch, fix or pseudocode)."""


@dataclass(frozen=True)
class PGTDConfig(CodeSearchConfig):
    """PG-TD (Zhang et al., 2023): MCTS over tokens, the policy's top-k as expansion, greedy rollouts
    scored by the share of public tests passed."""

    name: Literal["pgtd"] = "pgtd"
    """Planning-guided transformer decoding."""
    rollouts: Annotated[int, Range(1)] = 16
    """MCTS iterations per problem: each selects, expands and evaluates one node with a greedy rollout."""
    top_k: Annotated[int, Range(1)] = 3
    """Children of an expanded node: the policy's k most likely next tokens."""
    ucb_base: Annotated[float, Range(0, low_open=True)] = 10.0
    """P-UCB's c_base in beta(s) = log((N(s) + c_base + 1) / c_base) + c."""
    ucb_constant: Annotated[float, Range(0)] = 4.0
    """P-UCB's c."""


@dataclass(frozen=True)
class TransferQStarConfig(WorkflowConfig):
    """Transfer Q* (Chakraborty et al., 2024): each step samples pi(z|s) exp(alpha Q*(s, z)) over the top-k,
    Q* estimated from the `baseline=` model's rollouts scored by the reward (docs/tqstar.md)."""

    name: Literal["transfer_qstar"] = "transfer_qstar"
    """Transfer Q*."""
    alpha: Annotated[float, Range(0)] = 1.0
    """The decoding alignment strength (the reference code's `rm_weight`); 0 decodes the logit model itself."""
    top_k: Annotated[int, Range(1)] = 10
    """Candidate next tokens per step, the logit model's top-k (reference: 10)."""
    rollout_tokens: Annotated[int, Range(1)] = 20
    """L: tokens per rollout after each candidate (reference: 20 direct, 5 indirect); rollouts stop at EOS."""
    rollouts: Annotated[int, Range(1)] = 1
    """m: rollouts per candidate (reference: 1). With `rollout_sampling: greedy` it must be 1."""
    transfer: Literal["direct", "indirect"] = "direct"
    """`direct`: the baseline is aligned to the target reward, Q = mean rollout reward; `indirect`: it is
    aligned to `baseline.reward`, and importance weights exp((r - r_BL)/beta) correct for it."""
    estimator: Literal["normalized", "reference"] = "normalized"
    """Indirect transfer: `normalized`, self-normalised weights (consistent in m); `reference`, the reference
    code's unnormalised score w * r (biased between candidates; recorded as such)."""
    beta: Annotated[float, Range(0, low_open=True)] = 2.0
    """beta of the weights exp((r - r_BL)/beta) (reference: 1/beta = 0.5)."""
    rollout_sampling: Literal["greedy", "sample"] = "greedy"
    """How the baseline rolls out: `greedy` (the reference code's generate default) or `sample` (the paper)."""
    logit_model: Literal["policy", "baseline"] = "policy"
    """Whose logits give the candidates and log p: `policy` (the paper: the reference) or `baseline` (the
    reference code: the aligned model)."""
    greedy: bool = True
    """true: the argmax of log p + alpha Q (the reference's default); false: sample the guided law."""
    n: Annotated[int, Range(1)] = 1
    """Completions per prompt (sampled mode: each with its own stream); the first is the output."""

    def check(self) -> None:
        if self.rollout_sampling == "greedy" and self.rollouts > 1:
            raise Invalid("rollouts", f"={self.rollouts} with rollout_sampling=greedy would give {self.rollouts} "
                          "identical rollouts; set rollouts=1 or rollout_sampling=sample")
        if self.greedy and self.n > 1:
            raise Invalid("n", f"={self.n} with greedy=true would give identical completions; set greedy=false")


@dataclass(frozen=True)
class ArgsConfig(WorkflowConfig):
    """ARGS (Khanov et al., 2024): each step scores the top-k candidates by log p + alpha r(partial text)."""

    name: Literal["args"] = "args"
    """ARGS."""
    alpha: Annotated[float, Range(0)] = 1.0
    """The reward weight w (reference: 1.0 in its README, 1.5 in its released outputs); 0 is the policy."""
    top_k: Annotated[int, Range(1)] = 10
    """Candidate next tokens per step (reference: 10)."""
    greedy: bool = True
    """true: ARGS-greedy (argmax); false: ARGS-stochastic (sample softmax(log p + alpha r))."""
    n: Annotated[int, Range(1)] = 1
    """Completions per prompt (stochastic mode); the first is the output."""

    def check(self) -> None:
        if self.greedy and self.n > 1:
            raise Invalid("n", f"={self.n} with greedy=true would give identical completions; set greedy=false")


@dataclass(frozen=True)
class AlignBaselineConfig(WorkflowConfig):
    """Make a baseline for Transfer Q*: sample pairs from the policy, rank them by the reward, train by
    TRL's DPO; writes `baseline/` (a transformers folder) and its card into the run folder."""

    name: Literal["align_baseline"] = "align_baseline"
    """Baseline alignment by DPO."""
    n: Annotated[int, Range(2)] = 4
    """Samples per prompt; the best and the worst by reward form the prompt's pair."""
    min_margin: Annotated[float, Range(0)] = 0.05
    """A prompt whose best and worst rewards differ by less gives no pair."""
    beta: Annotated[float, Range(0, low_open=True)] = 0.1
    """DPO's beta (TRL `DPOConfig.beta`)."""
    learning_rate: Annotated[float, Range(0, low_open=True)] = 5e-6
    """AdamW learning rate."""
    epochs: Annotated[float, Range(0, low_open=True)] = 1.0
    """Passes over the pairs."""
    batch_size: Annotated[int, Range(1)] = 8
    """Pairs per optimiser step."""
    max_length: Annotated[int, Range(8)] = 256
    """Prompt plus completion tokens kept per example."""
    eval_n: Annotated[int, Range(1)] = 2
    """Samples per prompt from the trained model for the card's reward after (seeded as the pairs were)."""


@dataclass(frozen=True)
class WinRateConfig(WorkflowConfig):
    """The win rate of a candidate model against the reference (`model=`) under an inference-time
    procedure, judged by the reward with ties as half, with its interval over prompts, and the
    candidate's KL to the reference (k1 and k3, from log-probabilities of the candidate's samples)."""

    name: Literal["win_rate"] = "win_rate"
    """Win rate against the reference."""
    candidate: str | None = None
    """The candidate model: a local folder (e.g. a ctrl_align run's `model/`) or a hub id; null: the
    reference itself (a self-check: 0.5 within the interval)."""
    procedure: Literal["sample", "bon", "won"] = "sample"
    """Decoding applied to each side: one sample, Best-of-N or worst-of-N (`n`)."""
    n: Annotated[int, Range(1)] = 1
    """The procedure's N."""
    samples: Annotated[int, Range(1)] | None = None
    """Samples per side per prompt (>= n); the closed form averages over all their N-subsets. null: n."""
    opponent: Literal["procedure", "sample"] = "procedure"
    """`procedure`: T(candidate) against T(reference) (InfAlign's inference-time win rate); `sample`:
    T(candidate) against one reference sample (Best-of-N of the reference then gives N/(N+1))."""
    confidence: Annotated[float, Range(0, 1, low_open=True)] = 0.95
    """Coverage of the interval (`metrics.win_rate_ci_low`, `..._ci_high`), normal over prompts."""

    def check(self) -> None:
        if self.samples is not None and self.samples < self.n:
            raise Invalid("samples", f"must be >= workflow.n={self.n} (the procedure draws n of them), got {self.samples}")


@dataclass(frozen=True)
class CtrlAlignConfig(WorkflowConfig):
    """InfAlign's CTRL: KL-regularised RL (TRL's RLOOTrainer, KL estimator k1 in the reward) of the
    policy on the reward (with `reward=calibrated`, the transformed calibrated reward), then an
    evaluation of the trained model against the reference; the model is saved in the run folder."""

    name: Literal["ctrl_align"] = "ctrl_align"
    """CTRL alignment."""
    beta: Annotated[float, Range(0)] = 0.05
    """KL coefficient: the objective is E[reward] - beta KL(pi || pi_ref) (RLOOConfig.beta)."""
    steps: Annotated[int, Range(1)] = 12
    """Optimiser steps (RLOOConfig.max_steps)."""
    prompts_per_step: Annotated[int, Range(1)] = 2
    """Prompts per step; each gets `num_generations` completions."""
    num_generations: Annotated[int, Range(2)] = 4
    """Completions per prompt in a step (RLOO's leave-one-out baseline needs >= 2)."""
    learning_rate: Annotated[float, Range(0, low_open=True)] = 2e-5
    """AdamW learning rate (TRL's default, 1e-6, barely moves a 135M model in a few steps)."""
    eval_samples: Annotated[int, Range(1)] = 16
    """Samples per side per prompt at evaluation (>= every N in `eval_n`)."""
    eval_n: tuple[Annotated[int, Range(1)], ...] = (1, 4, 16)
    """Best-of-N win rates against Best-of-N of the reference reported at evaluation (1: plain sampling)."""

    def check(self) -> None:
        if any(n > self.eval_samples for n in self.eval_n):
            raise Invalid("eval_n", f"has N={max(self.eval_n)} above workflow.eval_samples={self.eval_samples}")


WORKFLOW_CONFIGS: dict[str, type[WorkflowConfig]] = {
    "best_of_n": BestOfNConfig,
    "repeated_sampling": RepeatedSamplingConfig,
    "ideasearch": IdeaSearchConfig,
    "plansearch": PlanSearchConfig,
    "pgtd": PGTDConfig,
    "sample": SampleConfig,
    "score": ScoreConfig,
    "speculative": SpeculativeWorkflowConfig,
    "controlled_decoding": ControlledDecodingConfig,
    "train_value": TrainValueConfig,
    "beam_search": BeamSearchConfig,
    "dvts": DVTSConfig,
    "transfer_qstar": TransferQStarConfig,
    "args": ArgsConfig,
    "align_baseline": AlignBaselineConfig,
    "win_rate": WinRateConfig,
    "ctrl_align": CtrlAlignConfig,
}
