"""Fitting prefix values by CD-FUDGE and CD-Q (Mudgal et al., 2023, section 2.3), and saving them.

Data are finished samples as token ids (prompt, completion) with their final rewards; the
fitters are plain functions over `ValueBatch`es and a torch optimiser, for any module with
`state_values(ids, mask) -> [B, T]` (and `q_values -> [B, T, V]` for CD-Q): the neural
`qsteer.values.ValueModel` and the exact `qsteer.values.tabular.TabularValue` alike.

- **CD-FUDGE** (on-policy Monte Carlo): every prefix [x, y<=t] of a completion sampled from the
  base policy is regressed on that completion's reward, loss 1/2 sum_t (V([x, y<=t]) - r)^2.
  Its minimiser is the mean reward of the samples through each prefix, an unbiased estimate of
  V^p because the samples come from the base policy.
- **CD-Q** (off-policy, Bellman): the target of a prefix is r at a finished sequence and
  sum_z p(z | s_t) Q_target(s_t)[z] otherwise (one base forward and one Q forward give every
  position's target). Any sequences will do, since the target averages over the base's next
  token instead of trusting the sampled one: its fixed point is V^p from uniform data too.
  Q_target is a frozen copy of the trainable parameters, refreshed every `target_sync_every`
  steps (1: a plain stop-gradient of the current parameters, the paper's form).
  A sequence cut at the length limit counts as finished with its reward (`truncated_is_terminal`,
  the spec's [I] choice).

Why a loop by hand: TRL's trainers do not fit this objective (its RewardTrainer is a pairwise
Bradley-Terry loss on whole sequences, its PRMTrainer classifies labelled steps; neither regresses
every token prefix, nor bootstraps from the base policy's next-token law), and transformers'
Trainer would need both a custom loss and a target-network callback to be of use; the loop
below is twenty lines. Scheduling comes from transformers (`get_scheduler`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import get_scheduler


@dataclass
class ValueBatch:
    """Right-padded sequences [B, T] with the span of each completion and its final reward."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    first: torch.Tensor  # [B] position of the first completion token (the prompt's length)
    last: torch.Tensor  # [B] position of the completion's last token
    rewards: torch.Tensor  # [B]
    terminal: torch.Tensor  # [B] whether the last state is finished (EOS, or truncated and counted so)
    weights: torch.Tensor  # [B] how many samples each row stands for (identical samples merged), float64

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def completion_mask(self) -> torch.Tensor:
        """[B, T] True at the positions of completion tokens: one regressed prefix each."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (pos >= self.first[:, None]) & (pos <= self.last[:, None])


def make_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
               rewards: Sequence[float], end_ids: Sequence[int], pad_id: int = 0,
               truncated_is_terminal: bool = True, weights: Sequence[float] | None = None,
               device: str | torch.device = "cpu") -> ValueBatch:
    """One `ValueBatch` from token-id lists (prompt as the policy saw it, completion as sampled).

    `weights` counts how many samples a row stands for: n identical (sequence, reward) samples
    merged into one row of weight n leave every loss unchanged and cost one row.
    """
    weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
    if not len(prompt_ids) == len(completion_ids) == len(rewards) == len(weights):
        raise ValueError(f"{len(prompt_ids)} prompts, {len(completion_ids)} completions, {len(rewards)} rewards")
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        if not prompt or not completion:
            raise ValueError(f"sample {i} has an empty {'prompt' if not prompt else 'completion'}")
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    ends = set(end_ids)
    terminal = [truncated_is_terminal or c[-1] in ends for c in completion_ids]
    return ValueBatch(
        input_ids=ids.to(device), attention_mask=mask.to(device),
        first=torch.tensor([len(p) for p in prompt_ids], device=device),
        last=torch.tensor([len(s) - 1 for s in seqs], device=device),
        rewards=torch.tensor([float(r) for r in rewards], dtype=torch.float64, device=device),
        terminal=torch.tensor(terminal, dtype=torch.bool, device=device),
        weights=torch.tensor(weights, dtype=torch.float64, device=device),
    )


def _regression(pred: torch.Tensor, target: torch.Tensor, batch: ValueBatch) -> torch.Tensor:
    """1/2 sum over a sequence's prefixes of the squared error, averaged over sequences."""
    err = (pred.double() - target.double()) * batch.completion_mask()
    return 0.5 * ((err * err).sum(-1) * batch.weights).sum() / batch.weights.sum()


def fudge_loss(model: nn.Module, batch: ValueBatch) -> torch.Tensor:
    """CD-FUDGE: every prefix of a base-policy sample regressed on the sample's final reward."""
    pred = model.state_values(batch.input_ids, batch.attention_mask)
    target = batch.rewards[:, None].expand_as(pred)
    return _regression(pred, target, batch)


class _QValues(nn.Module):
    """`q_values` as a forward, so that `torch.func.functional_call` can run it with target parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.q_values(input_ids, attention_mask)


@torch.no_grad()
def cdq_targets(model: nn.Module, base: nn.Module, batch: ValueBatch,
                target_params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, T] Bellman targets: r at a finished sequence's last token, else E_{z~p(.|s_t)} Q_target(s_t)[z]."""
    if getattr(model, "kind", None) != "q":
        raise ValueError("CD-Q needs a Q-head (value.kind=q): its target needs the value of every next token")
    base_out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = base_out.logits if hasattr(base_out, "logits") else base_out
    probs = torch.softmax(logits.double(), dim=-1)
    wrapped = _QValues(model)
    if target_params is None:
        q = wrapped(batch.input_ids, batch.attention_mask)
    else:
        params = {f"model.{name}": value for name, value in target_params.items()}
        q = torch.func.functional_call(wrapped, params, (batch.input_ids, batch.attention_mask))
    expected = (probs * q.double()).sum(-1)
    rows = torch.arange(len(batch), device=expected.device)
    finished = torch.zeros_like(expected, dtype=torch.bool)
    finished[rows, batch.last] = batch.terminal
    return torch.where(finished, batch.rewards[:, None].expand_as(expected), expected)


def cdq_loss(model: nn.Module, base: nn.Module, batch: ValueBatch,
             target_params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """CD-Q: every prefix regressed on its Bellman target under the base policy."""
    target = cdq_targets(model, base, batch, target_params)
    pred = model.state_values(batch.input_ids, batch.attention_mask)
    return _regression(pred, target, batch)


def fit_value(
    model: nn.Module,
    batches: Sequence[ValueBatch],
    method: Literal["fudge", "cdq"] = "fudge",
    *,
    base: nn.Module | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    target_sync_every: int = 1,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit `model` in place by `method`, `epochs` passes over `batches`; returns the loss of every step.

    `base` (the frozen base policy: `forward` giving `.logits`) is needed by CD-Q only. The
    default optimiser is AdamW over the parameters that require grad (a head on the policy's
    backbone trains the head alone).
    """
    if method not in ("fudge", "cdq"):
        raise ValueError(f"value.method={method!r} is not one of: fudge, cdq")
    if method == "cdq" and base is None:
        raise ValueError("CD-Q needs the base policy (its next-token law makes the targets)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the value model has no trainable parameters")
    optimizer = optimizer or torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    total = epochs * len(batches)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    target_params: dict[str, torch.Tensor] | None = None
    losses: list[float] = []
    model.train()
    for step in range(total):
        batch = batches[step % len(batches)]
        if method == "fudge":
            loss = fudge_loss(model, batch)
        else:
            if target_sync_every > 1 and step % target_sync_every == 0:
                target_params = {name: p.detach().clone() for name, p in named}
            loss = cdq_loss(model, base, batch, target_params if target_sync_every > 1 else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def heldout_metrics(model: nn.Module, batch: ValueBatch, constant: float) -> dict[str, float]:
    """How well values predict held-out rewards, against predicting the training mean `constant`.

    `final` reads V at the finished sequence (a reward model's job); `first` reads V after the
    first completion token (a prefix scorer's job, harder). Correlation is Pearson's.
    """
    model.eval()
    values = model.state_values(batch.input_ids, batch.attention_mask).double()
    rows = torch.arange(len(batch), device=values.device)
    rewards = batch.rewards.double()
    out: dict[str, float] = {"num_sequences": float(len(batch)),
                             "constant_mse": float(((rewards - constant) ** 2).mean())}
    for name, pos in (("final", batch.last), ("first", batch.first)):
        pred = values[rows, pos]
        out[f"{name}_mse"] = float(((pred - rewards) ** 2).mean())
        out[f"{name}_correlation"] = _pearson(pred, rewards)
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


@contextmanager
def new_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder beside `folder` that replaces it when the block ends: a crash leaves the old
    folder or the new one, never half of one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_value_model(
    folder: str | Path,
    model: nn.Module,
    *,
    method: str,
    losses: Sequence[float],
    train_sequences: int,
    train_prefixes: int,
    heldout: dict[str, float],
    tokenizer=None,
    end_ids: Sequence[int] = (),
    policy_path: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a fitted `ValueModel` as a transformers checkpoint plus its card, atomically.

    The folder gets the checkpoint (`ValueModel.save`; a separate scalar value is an
    `AutoModelForSequenceClassification` with one label), the tokenizer with a pad token that is
    no end token and a chat template that renders a finished reply as the policy generated it
    (so `reward=model` scores the state the value was trained on), `loss_curve.png`,
    `value_card.json` and a `README.md` card: method, data size, loss, held-out correlation.
    """
    import copy

    from qsteer.values.model import value_chat_template, value_pad_id

    folder = Path(folder)
    with new_folder(folder) as tmp:
        if tokenizer is not None:
            tokenizer = copy.deepcopy(tokenizer)
            pad = value_pad_id(tokenizer, list(end_ids) or [tokenizer.eos_token_id])
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
            if tokenizer.chat_template:
                tokenizer.chat_template = value_chat_template(tokenizer.chat_template)
            wrapper_config = getattr(getattr(model, "wrapper", None), "config", None)
            if wrapper_config is not None and not getattr(model, "on_policy", False):
                wrapper_config.pad_token_id = pad
        model.save(tmp, tokenizer=tokenizer, policy_path=policy_path)
        _plot_losses(losses, tmp / "loss_curve.png", method)
        card = {
            "method": method, "kind": getattr(model, "kind", None),
            "backbone": "policy" if getattr(model, "on_policy", False) else "separate",
            "train_sequences": train_sequences, "train_prefixes": train_prefixes, "steps": len(losses),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "heldout": heldout, **(extra or {}),
        }
        (tmp / "value_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(_card_text(card))
    return folder


def _plot_losses(losses: Sequence[float], path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses)
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{method} loss (1/2 sum over prefixes)")
    ax.set_title("value fit")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _card_text(card: dict) -> str:
    held = card["heldout"]

    def fmt(key: str) -> str:
        value = held.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    return (
        f"# Value model ({card['method']}, {card['kind']} head, {card['backbone']} backbone)\n\n"
        f"- training data: {card['train_sequences']} sequences, {card['train_prefixes']} prefixes; "
        f"{card['steps']} steps, loss {card['first_loss']} -> {card['last_loss']} (`loss_curve.png`)\n"
        f"- held-out ({int(held.get('num_sequences', 0))} sequences): correlation with the reward "
        f"{fmt('final_correlation')} at the finished text, {fmt('first_correlation')} after the first token; "
        f"MSE {fmt('final_mse')} against {fmt('constant_mse')} for the training mean\n"
    )


class _CachedBackbone(nn.Module):
    """The frozen policy's last hidden states of fixed batches, computed once and looked up by batch.

    A head on the policy trains on features that never change: recomputing them at every step
    cost about 20 s per step of 40 sequences on SmolLM2-135M here (docs/values.md), the head's
    own step a few milliseconds. The batches' `input_ids` tensors live as long as the fit, so
    their identity names them.
    """

    def __init__(self, backbone: nn.Module, batches: Sequence[ValueBatch], rows: int = 16) -> None:
        super().__init__()
        self.cache: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for batch in batches:
                parts = [backbone(input_ids=batch.input_ids[i : i + rows],
                                  attention_mask=batch.attention_mask[i : i + rows]).last_hidden_state
                         for i in range(0, len(batch), rows)]
                self.cache[id(batch.input_ids)] = torch.cat(parts)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.cache[id(input_ids)])


def fit_cached(folder: str | Path, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
               rewards: Sequence[float], heldout: Sequence[bool], end_ids: Sequence[int], *, policy_path: str,
               shape: str = "q", backbone: str = "policy", base_path: str | None = None, method: str = "fudge",
               lr: float = 1e-4, epochs: int = 8, train_batch: int = 32, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Fit a value on samples (`heldout[i]` marks the held-out ones), save it with its card into `folder`.

    backbone=policy with CD-FUDGE fits the head on the policy's hidden states computed once
    (`_CachedBackbone`); CD-Q's targets need the policy's next-token law at every position, so it
    runs the policy per step. Returns the card (`value_card.json`).
    """
    from qsteer.lm.loading import load_language_model
    from qsteer.values.model import ValueModel

    device = torch.device(device)
    dtype_name = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                  torch.float16: "float16"}[dtype]
    lm = load_language_model(policy_path, dtype=dtype_name, device=str(device))
    train = [i for i, held in enumerate(heldout) if not held]
    held = [i for i, h in enumerate(heldout) if h]
    if not train:
        raise ValueError("value training needs samples outside the held-out share")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    train = [train[i] for i in order]

    def batch_of(indices: list[int]) -> ValueBatch:
        return make_batch([prompt_ids[i] for i in indices], [completion_ids[i] for i in indices],
                          [rewards[i] for i in indices], end_ids, pad_id=lm.pad_id, device=device)

    batches = [batch_of(train[i : i + train_batch]) for i in range(0, len(train), train_batch)]
    held_batch = batch_of(held) if held else None
    if backbone == "policy":
        model = ValueModel.on_policy_model(lm.model, shape)
    else:
        model = ValueModel.separate(base_path or lm.path, shape, pad_token_id=lm.pad_id, dtype=dtype).to(device)
    cached = backbone == "policy" and method == "fudge"
    if cached:
        real = model.backbone
        model.backbone = _CachedBackbone(real, batches + ([held_batch] if held_batch is not None else []))
    losses = fit_value(model, batches, method, base=lm.model if method == "cdq" else None, epochs=epochs, lr=lr)
    constant = float(sum(rewards[i] for i in train) / len(train))
    metrics = heldout_metrics(model, held_batch, constant) if held_batch is not None else {}
    if cached:
        model.backbone = real
    save_value_model(folder, model, method=method, losses=losses, train_sequences=len(train),
                     train_prefixes=int(sum(int(b.completion_mask().sum()) for b in batches)), heldout=metrics,
                     tokenizer=lm.tokenizer, end_ids=end_ids, policy_path=lm.path,
                     extra={"lr": lr, "epochs": epochs, "train_batch": train_batch, "cached_features": cached,
                            "train_mean_reward": constant})
    return json.loads((Path(folder) / "value_card.json").read_text())
