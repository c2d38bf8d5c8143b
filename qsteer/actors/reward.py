"""The reward role: hosts one reward function, so slow or unsafe rewards leave the driver.

`Reward` wraps a callable with TRL's signature; `RewardActor` builds it from the reward config,
which is what a Ray replica (or a test's in-process group) hosts.
"""

from __future__ import annotations

import math
import traceback
from typing import Any

from qsteer.rewards import RewardFn, build_reward, split_reward


class Reward:
    def __init__(self, fn: RewardFn) -> None:
        self.fn = fn
        self.calls = 0

    def info(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None,
        columns: dict[str, list[Any]],
    ) -> list[tuple[float | None, dict]]:
        """(reward, info) per item. An item whose reward raises gets None and the error in info,
        found by retrying the failed batch one item at a time, so one bad item spoils nothing else."""
        self.calls += 1
        try:
            return self._call(prompts, completions, completion_ids, columns)
        except Exception:
            if len(prompts) == 1:
                return [(None, {"error": _last_line(traceback.format_exc())})]
        results = []
        for i in range(len(prompts)):
            ids = None if completion_ids is None else completion_ids[i : i + 1]
            item_columns = {key: values[i : i + 1] for key, values in columns.items()}
            try:
                results.extend(self._call(prompts[i : i + 1], completions[i : i + 1], ids, item_columns))
            except Exception:
                results.append((None, {"error": _last_line(traceback.format_exc())}))
        return results

    def _call(self, prompts, completions, completion_ids, columns) -> list[tuple[float | None, dict]]:
        values = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(values) != len(prompts):
            raise ValueError(f"reward returned {len(values)} values for {len(prompts)} completions")
        return [_finite(*split_reward(v)) for v in values]


def _finite(reward: float | None, info: dict) -> tuple[float | None, dict]:
    """A NaN or infinite reward is the item's error: no mean, max or JSON file can hold it honestly."""
    if reward is not None and not math.isfinite(reward):
        return None, {**info, "error": f"reward is {reward} (not a finite number)"}
    return reward, info


class RewardActor(Reward):
    def __init__(self, name: str | None = None, target: str | None = None, kwargs: dict | None = None) -> None:
        super().__init__(build_reward(name, target, **(kwargs or {})))


def _last_line(trace: str) -> str:
    return trace.strip().splitlines()[-1]
