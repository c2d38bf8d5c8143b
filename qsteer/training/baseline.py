"""Align a baseline by DPO (TRL's `DPOTrainer`) on preference pairs, and save it with its card.

Transfer Q* needs a baseline already aligned to a reward. `workflow=align_baseline` samples pairs
from the policy actors and ranks them by the reward actors; this module runs the optimisation:
TRL's DPO (Rafailov et al., 2023) with the policy as its own frozen reference, on conversational
pairs ([user: prompt] -> assistant: chosen / rejected), which TRL renders through the chat template
exactly as the policy's engine renders prompts (`apply_chat_template(..., add_generation_prompt=True)`).

The model is written as a plain transformers folder (config, safetensors, tokenizer, chat template)
so `baseline.path=` (or `model.path=`) loads it; the folder appears whole or not at all (written
beside, then renamed). `write_card` adds `baseline_card.json` and a README: the data, the DPO
settings, the loss per step, and the mean reward before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Pair:
    prompt: str | list[dict]  # text, or chat messages
    chosen: str
    rejected: str


def _conversation(pair: Pair, chat: bool) -> dict[str, Any]:
    if not chat:
        prompt = pair.prompt if isinstance(pair.prompt, str) else "\n".join(m["content"] for m in pair.prompt)
        return {"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    messages = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}]}


def align_dpo(model_path: str, pairs: list[Pair], out_dir: str | Path, *, beta: float, learning_rate: float,
              epochs: float, batch_size: int, max_length: int, seed: int, chat: bool = True,
              num_threads: int | None = None) -> dict[str, Any]:
    """Train `model_path` by DPO on `pairs` and save it to `out_dir`; returns the training record."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from qsteer.models import resolve_model_path

    if not pairs:
        raise ValueError("DPO needs at least one preference pair; none had a reward margin (lower workflow.min_margin "
                         "or raise workflow.n)")
    if num_threads:
        torch.set_num_threads(num_threads)
    path = resolve_model_path(model_path)
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".training")
    shutil.rmtree(work, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(work / "trainer"), per_device_train_batch_size=batch_size, num_train_epochs=epochs,
        learning_rate=learning_rate, beta=beta, max_length=max_length, logging_steps=1, save_strategy="no",
        report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(), bf16=False, disable_dropout=True,
        lr_scheduler_type="constant", disable_tqdm=True,
    )
    data = Dataset.from_list([_conversation(p, chat) for p in pairs])
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    log = trainer.state.log_history
    losses = [round(float(e["loss"]), 6) for e in log if "loss" in e]
    margins = [round(float(e["rewards/margins"]), 6) for e in log if "rewards/margins" in e]
    trainer.save_model(str(work / "model"))
    tokenizer.save_pretrained(str(work / "model"))
    (work / "model" / "training_args.bin").unlink(missing_ok=True)  # a pickle: the card holds the settings
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(work / "model", out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return {"base_model": model_path, "pairs": len(pairs), "steps": int(trainer.state.global_step),
            "loss": losses, "reward_margins": margins, "train_s": round(time.perf_counter() - started, 2),
            "dpo": {"beta": beta, "learning_rate": learning_rate, "epochs": epochs, "batch_size": batch_size,
                    "max_length": max_length, "trl": _version("trl")}}


def write_card(out_dir: str | Path, card: dict[str, Any]) -> None:
    """`baseline_card.json` and `README.md` in the model folder (each written atomically)."""
    out_dir = Path(out_dir)
    _write(out_dir / "baseline_card.json", json.dumps(card, indent=2) + "\n")
    loss = card.get("loss") or []
    lines = [
        "# Baseline aligned by DPO (qsteer workflow=align_baseline)",
        "",
        f"- base model: {card.get('base_model')}",
        f"- reward: {card.get('reward')}",
        f"- preference pairs: {card.get('pairs')} (best vs worst of {card.get('samples_per_prompt')} samples "
        f"of {card.get('prompts')} prompts, margin >= {card.get('min_margin')})",
        f"- DPO: {card.get('dpo')}; {card.get('steps')} steps in {card.get('train_s')} s",
        f"- loss: first {loss[0] if loss else None}, last {loss[-1] if loss else None}",
        f"- mean reward before: {card.get('reward_before')}, after: {card.get('reward_after')} "
        f"({card.get('eval_samples')} samples each, same prompts and seeds)",
        "",
        "Use it as Transfer Q*'s baseline: `qsteer workflow=transfer_qstar baseline.path=THIS_FOLDER`.",
    ]
    _write(out_dir / "README.md", "\n".join(lines) + "\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
