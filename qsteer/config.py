"""Checks on the composed config, run before any model loads; each error names its key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from qsteer.data import DATASETS
from qsteer.rewards import BUILTIN_REWARDS, import_object
from qsteer.workflows import WORKFLOWS
from qsteer.workflows.best_of_n import AGGREGATES

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    pass


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{key} is required but not set (add `{key}=...` to the command)") from err


def _int(cfg: DictConfig, key: str, minimum: int) -> None:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _number(cfg: DictConfig, key: str, low: float, high: float, low_open: bool = False) -> None:
    value = _get(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{key} must be a number in {bracket}{low}, {high}], got {value!r}")


def _choice(cfg: DictConfig, key: str, choices) -> None:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key; cheap, so it runs before Ray or any model."""
    _choice(cfg, "workflow.name", sorted(WORKFLOWS))
    _int(cfg, "seed", 0)
    _int(cfg, "batch_size", 1)
    name = cfg.workflow.name
    if name in ("best_of_n", "sample"):
        _int(cfg, "workflow.n", 1)
    if name == "best_of_n":
        _choice(cfg, "workflow.aggregate", AGGREGATES)
        pattern = _get(cfg, "workflow.answer_pattern")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"workflow.answer_pattern is not a valid regex: {err}") from err
    if "policy" in WORKFLOWS[name].roles:
        _int(cfg, "generation.max_new_tokens", 1)
        _number(cfg, "generation.temperature", 0.0, 100.0)
        _number(cfg, "generation.top_p", 0.0, 1.0, low_open=True)
        _int(cfg, "generation.top_k", 0)
        stop = _get(cfg, "generation.stop")
        if not OmegaConf.is_list(stop) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"generation.stop must be a list of non-empty strings, got {stop!r}")
        _choice(cfg, "model.engine", ("hf", "vllm"))
        _choice(cfg, "model.dtype", _DTYPES)
        _int(cfg, "model.replicas", 1)
        _int(cfg, "model.max_batch_rows", 1)
        if _get(cfg, "model.path") in (None, ""):
            raise ConfigError("model.path is empty; use `default` for the shipped model, a folder or a hub id")
        gpus = _get(cfg, "model.num_gpus")
        if gpus != "auto":
            _number(cfg, "model.num_gpus", 0, 1024)
        speculative_config(cfg)
    _check_reward(cfg)
    _choice(cfg, "dataset.name", sorted(DATASETS))
    if cfg.dataset.name == "jsonl":
        _get(cfg, "dataset.path")
    limit = _get(cfg, "dataset.limit")
    if limit is not None:
        _int(cfg, "dataset.limit", 0)


def speculative_config(cfg: DictConfig) -> dict | None:
    """The draft config the policy decodes with (SamplingParams.speculative), or None for plain decoding.

    workflow=speculative always uses the `draft=` group; any other workflow does when
    generation.speculative is true, or names a draft kind (its shipped defaults then apply).
    """
    from qsteer.speculative.config import KINDS, SpeculativeConfig

    choice = _get(cfg, "generation.speculative")
    if cfg.workflow.name == "speculative" and choice in (False, None):
        choice = True
    if choice in (False, None):
        return None
    if choice is True:
        draft = OmegaConf.to_container(_get(cfg, "draft"), resolve=True)
        if not isinstance(draft, dict):
            raise ConfigError("draft is not set: choose one with draft=lookup (or recycle, layerskip, model)")
    elif choice in KINDS:
        selected = OmegaConf.select(cfg, "draft.kind")
        source = cfg.draft if selected == choice else OmegaConf.load(Path(__file__).parent / "conf" / "draft" / f"{choice}.yaml")
        draft = OmegaConf.to_container(source, resolve=True)
    else:
        raise ConfigError(f"generation.speculative={choice!r} is not one of: false, true, {', '.join(KINDS)}")
    draft.pop("actor", None)
    try:
        SpeculativeConfig.from_dict(draft)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return draft


def _check_reward(cfg: DictConfig) -> None:
    target = _get(cfg, "reward.target")
    if target:
        try:
            obj = import_object(target)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"reward.target={target!r} cannot be imported: {err}") from err
        if not callable(obj):
            raise ConfigError(f"reward.target={target!r} is not callable")
        return
    _choice(cfg, "reward.name", sorted(BUILTIN_REWARDS))
