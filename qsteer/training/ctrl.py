"""CTRL's RL step (InfAlign, §4.2 step 3): KL-regularised RL through TRL's RLOOTrainer, and the model card.

The objective is max_pi E_x E_{y~pi}[R(x, y)] - beta KL(pi || pi_ref), R the (transformed,
calibrated) reward; its optimum pi_ref exp(R/beta) is what the analytic calibrated-space tool
(`metrics.calibrated_space`) and its default t assume. TRL 1.16's `RLOOTrainer` optimises exactly
that: it subtracts beta times the sequence-level k1 estimate (sum_t log pi_old - log pi_ref, on the
policy's own samples) from each reward, then uses the leave-one-out baseline, with
`normalize_advantages=False`. `GRPOTrainer` instead adds the per-token k3 estimate to the loss,
scales rewards per prompt (`scale_rewards="group"`: each prompt its own effective beta) and
normalises the loss per token (`loss_type="dapo"`), so its fixed point is not pi_ref exp(R/beta)
with one beta; that is why this module uses RLOO. The KL estimator is therefore **k1, per
sequence, inside the reward**; TRL logs it as `kl` (per token). The evaluation after training
(`workflows.ctrl_align`) reports unbiased per-sequence k1 and k3 from fresh samples.

The reward function is passed in with TRL's signature; in the workflow it calls the reward actors
(and, for `reward=calibrated`, the reference samples came from the policy actors before training).
Generation during training is the trainer's own (transformers here; `use_vllm` on GPUs).
`train` saves the trained model and tokenizer as a transformers folder (which `model.path=` loads
in any workflow), and a training card: `training_card.json` (per step: reward, calibrated reward,
KL, step time split into scoring and the rest), `README.md` and `training_curves.png`.

Measured on the 2-core CPU (default model, 2 prompts x 4 generations x 16 tokens per step): see
docs/ctrl.md and benchmarks/results/ctrl_*.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qsteer.training.value import new_folder

KL_ESTIMATOR = "k1 (RLOO: beta * sum_t (log pi_old - log pi_ref) per sequence, subtracted from the reward)"


@dataclass(frozen=True)
class CtrlSettings:
    """What `train` needs besides the model, the prompts and the reward (the workflow's config, plainly)."""

    beta: float = 0.05
    steps: int = 12
    prompts_per_step: int = 2
    num_generations: int = 4
    learning_rate: float = 2e-5
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chat: bool = True


@dataclass
class TrainResult:
    model_dir: Path
    card: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


class _Timer:
    """Wall time of each optimiser step and of the reward calls inside it."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.scoring_s: list[float] = []
        self._scoring = 0.0
        self._started = 0.0

    def begin(self) -> None:
        self._scoring, self._started = 0.0, time.perf_counter()

    def end(self) -> None:
        self.step_s.append(time.perf_counter() - self._started)
        self.scoring_s.append(self._scoring)

    def add_scoring(self, seconds: float) -> None:
        self._scoring += seconds


def trl_reward(reward: Callable[..., list[float | None]], records: Sequence[dict], timer: _Timer | None = None):
    """`reward` (TRL's signature over qsteer's text prompts and the records' columns) as TRL calls it.

    TRL passes the dataset's prompts (chat messages here), completions (for chat prompts, one
    assistant message each) and the dataset's other columns; `qsteer_index` finds each prompt's
    record, whose text and columns go to `reward`.
    """

    def ctrl_reward(prompts, completions, completion_ids=None, qsteer_index=None, log_metric=None, **_: Any):
        started = time.perf_counter()
        rows = [records[i] for i in qsteer_index]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        values = reward(rows, texts, completion_ids, log_metric)
        if timer is not None:
            timer.add_scoring(time.perf_counter() - started)
        return values

    ctrl_reward.__name__ = "ctrl_reward"
    return ctrl_reward


def train(
    model_path: str,
    records: Sequence[dict],
    reward: Callable[..., list[float | None]],
    out_dir: str | Path,
    settings: CtrlSettings,
    extra_card: dict[str, Any] | None = None,
) -> TrainResult:
    """Run RLOO on `records` (dicts with `prompt` text and `id`) and save the model and its card into `out_dir/model`.

    `reward(records, completions, completion_ids, log_metric)` returns one reward per completion.
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    out_dir = Path(out_dir)
    timer = _Timer()
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}] if settings.chat else r["prompt"],
         "id": str(r["id"]), "qsteer_index": i}
        for i, r in enumerate(records)
    ]
    args = RLOOConfig(
        output_dir=str(out_dir / "trainer"),
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        beta=settings.beta,
        normalize_advantages=False,
        learning_rate=settings.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
    )

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            timer.begin()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            timer.end()

    trainer = RLOOTrainer(
        model=model_path,
        reward_funcs=[trl_reward(reward, records, timer)],
        args=args,
        train_dataset=Dataset.from_list(rows),
        callbacks=[StepTimes()],
    )
    trainer.train()
    history = [dict(entry) for entry in trainer.state.log_history]
    card = training_card(history, timer, settings, extra_card or {})
    model_dir = out_dir / "model"
    save_model(trainer, model_dir, card)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    return TrainResult(model_dir, card, history)


def training_card(history: list[dict], timer: _Timer, settings: CtrlSettings, extra: dict) -> dict[str, Any]:
    """Per-step reward, calibrated reward, KL and times from the trainer's log and the step timer."""
    steps = [h for h in history if "reward" in h]

    def series(key: str) -> list[float | None]:
        return [h.get(key) for h in steps]

    step_s, scoring_s = timer.step_s, timer.scoring_s
    return {
        "trainer": "trl.RLOOTrainer",
        "kl_estimator": KL_ESTIMATOR,
        "settings": settings.__dict__,
        "steps": len(steps),
        "reward": series("reward"),
        "calibrated_reward": series("calibrated_reward"),
        "raw_reward": series("raw_reward"),
        "kl_per_token": series("kl"),
        "step_s": step_s,
        "scoring_s": scoring_s,
        "trainer_s": [max(0.0, s - r) for s, r in zip(step_s, scoring_s, strict=False)],
        **extra,
    }


def save_model(trainer: Any, folder: Path, card: dict[str, Any]) -> Path:
    """The trained model and tokenizer (a transformers folder) with the card, moved into place atomically."""
    with new_folder(folder) as tmp:
        trainer.model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        (tmp / "training_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        plot_card(card, tmp / "training_curves.png")
        (tmp / "README.md").write_text(card_text(card))
    return folder


def plot_card(card: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, card["steps"] + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("reward", "calibrated_reward"):
        values = card[key]
        if any(v is not None for v in values):
            left.plot(steps, [math.nan if v is None else v for v in values], label=key)
    left.set_xlabel("step")
    left.set_ylabel("mean over the step's samples")
    left.legend()
    right.plot(steps, [math.nan if v is None else v for v in card["kl_per_token"]])
    right.set_xlabel("step")
    right.set_ylabel("KL per token (TRL's k1)")
    fig.suptitle(f"CTRL (RLOO), beta={card['settings']['beta']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def card_text(card: dict[str, Any]) -> str:
    def first_last(key: str) -> str:
        values = [v for v in card[key] if v is not None]
        return f"{values[0]:.4f} -> {values[-1]:.4f}" if values else "n/a"

    s = card["settings"]
    lines = [
        "# CTRL-aligned model (TRL RLOOTrainer)",
        "",
        f"- {card['steps']} steps, {s['prompts_per_step']} prompts x {s['num_generations']} generations x "
        f"{s['max_new_tokens']} tokens per step, beta {s['beta']}, learning rate {s['learning_rate']}",
        f"- reward {first_last('reward')}; calibrated reward {first_last('calibrated_reward')}; "
        f"KL per token {first_last('kl_per_token')} (`training_curves.png`)",
        f"- KL estimator in training: {card['kl_estimator']}",
    ]
    if card.get("evaluation"):
        lines.append(f"- evaluation: {json.dumps(card['evaluation'], default=str)}")
    return "\n".join(lines) + "\n"


def trained_engine(model_dir: str | Path, max_batch_rows: int = 64) -> Any:
    """The saved model on the hf engine in this process, for the evaluation against the reference actors."""
    from qsteer.engines import build_engine

    return build_engine("hf", path=str(model_dir), max_batch_rows=max_batch_rows)
