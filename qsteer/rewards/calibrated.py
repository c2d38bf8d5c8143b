"""Calibrated rewards (InfAlign's CTRL, steps 1 and 2): a reward's rank among reference samples, transformed.

For each prompt x, M reference completions z_j ~ pi_ref(.|x) are scored once by the base reward r.
A completion y's calibrated reward is its empirical CDF among them, ties counted as half:

    C(x, y) = (#{j: r(x, z_j) < r(x, y)} + 1/2 #{j: r(x, z_j) = r(x, y)}) / M   in [0, 1]

(two `searchsorted` calls on the sorted reference scores). Under pi_ref, C is uniform (ties
aside), and it is unchanged by any increasing map of r, so the reward model's scale and each
prompt's difficulty drop out. The standard win rate against pi_ref is E[C] exactly, so RL on
C itself ("identity") is the calibrated baseline; for a policy that will be decoded with
Best-of-N the reward is then transformed by exp(t C), for worst-of-N by -exp(-t C)
(`qsteer.metrics.calibrated_space.transform`, which also gives the default t for an N and a
KL budget). Resolution is 1/M: use M >= 32.

`CalibratedReward` wraps any reward with TRL's reward-function signature and has that
signature itself, so it goes to TRL's trainers (`reward_funcs=[...]`) and to every qsteer
workflow unchanged. Reference scores come from a provider passed in (in-process sampling and
scoring for tests, the policy and reward actors in the workflows), so this module needs no
engine and no Ray. They are cached in memory and, with a `ReferenceCache`, on disk, one file
per prompt keyed by reference model, base reward, sampling settings, seed and M, written
atomically, so a resumed or repeated run never samples a prompt's references twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qsteer.metrics.calibrated_space import TRANSFORMS, default_t, transform
from qsteer.rewards import RewardFn, split_reward

__all__ = [
    "TRANSFORMS",
    "CalibratedReward",
    "ReferenceCache",
    "calibrate",
    "default_t",
    "reference_scores_from_samples",
    "transform",
]

# prompts, their dataset columns (one dict per prompt), M -> per prompt, M reference scores.
ReferenceScores = Callable[[list[Any], list[dict[str, Any]], int], list[list[float | None]]]
# prompts, their dataset columns, M -> per prompt, M reference completions (text).
ReferenceSampler = Callable[[list[Any], list[dict[str, Any]], int], list[list[str]]]


def calibrate(scores: Sequence[float] | np.ndarray, reference_scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Each score's empirical CDF among `reference_scores`, ties counted as half, in [0, 1]."""
    reference = np.sort(np.asarray(reference_scores, dtype=np.float64))
    values = np.asarray(scores, dtype=np.float64)
    if reference.size == 0:
        raise ValueError("calibrate needs at least one reference score")
    if np.isnan(reference).any() or np.isnan(values).any():
        # NaN sorts last and compares false both ways: it would silently rank as a tie or a loss.
        raise ValueError("calibrate got a NaN score; drop failed samples before calibrating")
    below = np.searchsorted(reference, values, side="left")
    at_or_below = np.searchsorted(reference, values, side="right")
    return (below + 0.5 * (at_or_below - below)) / reference.size


def prompt_key(prompt: Any) -> str:
    """A prompt as text: itself, or a chat (list of messages) as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class ReferenceCache:
    """Reference scores on disk, one JSON file per prompt, under `folder`.

    A prompt's scores are fixed by the reference model, the base reward, the sampling settings,
    the seed and M; all of them, with the prompt, make the file's key, so changing any one of
    them samples afresh instead of reusing stale scores. Files are written to a temporary name
    and moved into place (`os.replace`), so a crash never leaves a torn file and concurrent
    writers of the same prompt (which write the same scores) cannot corrupt each other.
    """

    folder: str | Path
    model: str  # the reference policy's path or id
    reward: str  # the base reward's name and settings, e.g. "sentiment" or "judge:model=..."
    sampling: Mapping[str, Any] = field(default_factory=dict)  # max_new_tokens, temperature, top_p, ...
    seed: int = 0

    def key(self, prompt: Any, num_reference: int) -> dict[str, Any]:
        key = {
            "model": self.model,
            "reward": self.reward,
            "sampling": dict(self.sampling),
            "seed": self.seed,
            "num_reference": num_reference,
            "prompt": prompt_key(prompt),
        }
        try:
            # as it reads back from the file (tuples become lists), so a stored key compares equal
            return json.loads(json.dumps(key, sort_keys=True))
        except TypeError as err:
            raise TypeError(f"reference cache key must be plain JSON data (pass sampling as a dict): {err}") from err

    def path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return Path(self.folder) / digest[:2] / f"{digest}.json"

    def load(self, prompt: Any, num_reference: int) -> list[float] | None:
        key = self.key(prompt, num_reference)
        path = self.path(key)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"reference cache file {path} is not valid JSON ({err}); delete it to resample") from err
        if stored.get("key") != key:  # a hash collision, or a file copied from elsewhere
            return None
        return [float(score) for score in stored["scores"]]

    def store(self, prompt: Any, num_reference: int, scores: Sequence[float]) -> Path:
        key = self.key(prompt, num_reference)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "scores": [float(score) for score in scores]})
        handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False)
        try:
            with handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
        return path


def reference_scores_from_samples(sample: ReferenceSampler, base: RewardFn) -> ReferenceScores:
    """A reference-score provider that samples with `sample` and scores in this process with `base`.

    Each reference completion is scored with its prompt's dataset columns, as the completion
    under training is (a code reward needs the prompt's tests).
    """

    def reference_scores(prompts: list[Any], columns: list[dict[str, Any]], num_reference: int):
        samples = sample(prompts, columns, num_reference)
        if len(samples) != len(prompts):
            raise ValueError(f"reference sampler returned {len(samples)} lists for {len(prompts)} prompts")
        flat_prompts, flat_completions, flat_columns = [], [], {name: [] for name in (columns[0] if columns else {})}
        for prompt, row, completions in zip(prompts, columns, samples, strict=True):
            for completion in completions:
                flat_prompts.append(prompt)
                flat_completions.append(completion)
                for name in flat_columns:
                    flat_columns[name].append(row[name])
        values = [split_reward(item)[0] for item in base(flat_prompts, flat_completions, **flat_columns)]
        scores, start = [], 0
        for completions in samples:
            scores.append(values[start : start + len(completions)])
            start += len(completions)
        return scores

    return reference_scores


class CalibratedReward:
    """Any reward, calibrated against reference samples and transformed; TRL's reward-function signature.

    `reward(prompts, completions, completion_ids=None, **columns)` returns, per completion,
    Phi(C(x, y)) (None where the base reward gave None). `columns` are the dataset's fields, one
    list per field aligned with `prompts`, passed to the base reward and, per prompt, to the
    reference provider; other keywords (TRL's `trainer_state`, ...) go to the base reward only.
    Inside a TRL trainer it logs the mean calibrated reward C before the transform
    (`calibrated_reward`) and each completion's C (column `calibrated`).
    """

    def __init__(
        self,
        base: RewardFn,
        reference_scores: ReferenceScores,
        num_reference: int = 32,
        transform: str = "identity",
        t: float | None = None,
        cache: ReferenceCache | None = None,
    ) -> None:
        if num_reference < 1:
            raise ValueError(f"reward.num_reference must be >= 1, got {num_reference}")
        if transform not in TRANSFORMS:
            raise ValueError(f"reward.transform must be one of {TRANSFORMS}, got {transform!r}")
        if transform != "identity" and (t is None or not t > 0):
            raise ValueError(
                f"reward.transform={transform} needs reward.t > 0 (got {t!r}); "
                "qsteer.metrics.calibrated_space.default_t(transform, N, kl) gives one for an N and a KL budget"
            )
        self.base = base
        self.reference_scores = reference_scores
        self.num_reference = num_reference
        self.transform = transform
        self.t = t
        self.cache = cache
        self.__name__ = f"calibrated_{transform}"  # TRL names a reward's logged metrics after it
        self._sorted: dict[str, np.ndarray] = {}

    def reference(self, prompts: Sequence[Any], columns: Sequence[Mapping[str, Any]] | None = None) -> list[np.ndarray]:
        """Each prompt's sorted reference scores: from memory, the disk cache, or the provider (once per prompt)."""
        columns = list(columns) if columns is not None else [{} for _ in prompts]
        missing: dict[str, int] = {}  # prompt key -> index of its first occurrence
        for index, prompt in enumerate(prompts):
            key = prompt_key(prompt)
            if key in self._sorted or key in missing:
                continue
            stored = self.cache.load(prompt, self.num_reference) if self.cache else None
            if stored is not None:
                self._sorted[key] = np.sort(np.asarray(stored, dtype=np.float64))
            else:
                missing[key] = index
        if missing:
            todo = list(missing.values())
            fresh = self.reference_scores(
                [prompts[i] for i in todo], [dict(columns[i]) for i in todo], self.num_reference
            )
            if len(fresh) != len(todo):
                raise ValueError(f"reference provider returned {len(fresh)} score lists for {len(todo)} prompts")
            for i, scores in zip(todo, fresh, strict=True):
                kept = [float(s) for s in scores if s is not None and not np.isnan(s)]
                if not kept:
                    raise ValueError(f"every reference sample of prompt {prompt_key(prompts[i])[:80]!r} failed to score")
                if self.cache:
                    self.cache.store(prompts[i], self.num_reference, kept)
                self._sorted[prompt_key(prompts[i])] = np.sort(np.asarray(kept, dtype=np.float64))
        return [self._sorted[prompt_key(prompt)] for prompt in prompts]

    def calibrated(
        self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **columns: Any
    ) -> list[float | None]:
        """C(x, y) per completion, before the transform."""
        raw = [split_reward(item)[0] for item in self.base(prompts, completions, completion_ids=completion_ids, **columns)]
        if len(raw) != len(prompts):
            raise ValueError(f"base reward returned {len(raw)} rewards for {len(prompts)} completions")
        rows = [
            {name: values[i] for name, values in columns.items() if _is_column(values, len(prompts))}
            for i in range(len(prompts))
        ]
        references = self.reference(prompts, rows)
        return [
            None if score is None else float(calibrate([score], reference)[0])
            for score, reference in zip(raw, references, strict=True)
        ]

    def __call__(
        self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **columns: Any
    ) -> list[float | None]:
        log_metric, log_extra = columns.pop("log_metric", None), columns.pop("log_extra", None)
        calibrated = self.calibrated(prompts, completions, completion_ids=completion_ids, **columns)
        scored = [u for u in calibrated if u is not None]
        if log_metric is not None and scored:
            log_metric("calibrated_reward", float(np.mean(scored)))
        if log_extra is not None:
            log_extra("calibrated", calibrated)
        return [None if u is None else float(transform([u], self.transform, self.t)[0]) for u in calibrated]


def _is_column(values: Any, length: int) -> bool:
    return isinstance(values, (list, tuple)) and len(values) == length
