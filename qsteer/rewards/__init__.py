"""Reward functions and their registry.

A reward has TRL's reward-function signature, so TRL callables work unchanged:

    fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
       **columns) -> list[float | None]

`columns` carries the dataset's other fields, one list per field, aligned with `prompts`.
A built-in reward may instead return `{"reward": float, "info": {...}}` per item; the info
(a failing test's reason, ...) is kept beside the reward in `results.jsonl`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list[Any]]

# name -> "module:factory"; factories take the reward config's keys as keyword arguments.
BUILTIN_REWARDS = {
    "sentiment": "qsteer.rewards.sentiment:SentimentReward",
    "code_tests": "qsteer.rewards.code_tests:CodeTestsReward",
    "judge": "qsteer.rewards.judge:JudgeReward",
    "model": "qsteer.rewards.model:ModelReward",
}


# Built-in rewards whose values mean pass (1.0) or fail (0.0). A callable declares the same with
# a `pass_fail = True` attribute. The summary then counts errors as failures and reports pass@k.
PASS_FAIL_REWARDS = {"code_tests"}


# Dataset fields a built-in reward reads, each a tuple of alternatives: checked before any model loads.
REQUIRED_COLUMNS = {"code_tests": (("test", "tests"), ("entry_point",))}


def is_pass_fail(name: str | None, target: str | None = None) -> bool:
    """Whether the reward (`reward.name`, or the callable at `reward.target`) is declared pass/fail."""
    if target:
        return bool(getattr(import_object(target), "pass_fail", False))
    return name in PASS_FAIL_REWARDS


def import_object(path: str) -> Any:
    """Import `pkg.module:attr` or `pkg.module.attr`."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path like 'package.module:function'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from err


def build_reward(name: str | None, target: str | None = None, **kwargs: Any) -> RewardFn:
    """A built-in reward by `name`, or any callable (or factory, with kwargs) by `target`."""
    if target:
        obj = import_object(target)
        return obj(**kwargs) if kwargs or isinstance(obj, type) else obj
    if name not in BUILTIN_REWARDS:
        raise KeyError(f"unknown reward {name!r}; built-in: {sorted(BUILTIN_REWARDS)} (or set reward.target)")
    return import_object(BUILTIN_REWARDS[name])(**kwargs)


def split_reward(value: Any) -> tuple[float | None, dict]:
    """Normalize one reward item into (reward, info)."""
    if isinstance(value, dict):
        reward = value.get("reward")
        return (None if reward is None else float(reward)), dict(value.get("info") or {})
    return (None if value is None else float(value)), {}
