"""The value role: prefix values served over token-id lists, and the trainer that fits one.

`Value` holds any `ValueFunction` (token ids in, floats out) and counts its calls; `ValueActor`
builds one from the `value=` group's separate-backbone checkpoints (several with weights: the
multi-objective sum), which is what a Ray replica hosts. A policy actor reaches value actors
through `RemoteValue`, itself a `ValueFunction`, and hands it down to the guided loop as a
scorer, as it hands down a draft actor: the engine and the loop never see Ray.

Heads on the policy's own backbone do not live here: they ride in the policy actors
(`Policy.load_value_heads`), so their values come from the policy's forward.

`ValueTrainer` fits a value by CD-FUDGE or CD-Q (`qsteer.training.value`) on samples the
workflow gathered from the policy and reward roles, and returns the checkpoint folder's files,
so that the orchestrator writes them into the run folder wherever the trainer ran.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from qsteer.lm.loading import pick_device, pick_dtype
from qsteer.values import ValueFunction, ValueScorer, WeightedValues, load_value_model


class Value:
    """A `ValueFunction` served to workflows and policy actors; counts the calls that cost model time."""

    def __init__(self, value: ValueFunction) -> None:
        self.value = value
        self.calls = 0

    def info(self) -> dict[str, Any]:
        return {"calls": self.calls, "pid": os.getpid()}

    def values(self, prefixes: list[list[int]]) -> list[float]:
        self.calls += 1
        return self.value.values(prefixes)

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        self.calls += 1
        return self.value.next_values(prefixes, candidates)


def load_values(terms: list[tuple[str, float]], dtype: str = "auto", device: str = "auto",
                max_batch_rows: int = 64, policy: torch.nn.Module | None = None) -> ValueFunction:
    """sum_i w_i V_i over the checkpoints `terms` ((path, weight) pairs), each as a batched `ValueScorer`."""
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    scorers = []
    for path, _ in terms:
        model = load_value_model(path, policy=policy, dtype=torch_dtype).to(torch_device)
        scorers.append(ValueScorer(model, pad_id=0, max_batch_rows=max_batch_rows, device=torch_device))
    if len(terms) == 1 and terms[0][1] == 1.0:
        return scorers[0]
    return WeightedValues(scorers, [w for _, w in terms])


class ValueActor(Value):
    def __init__(self, terms: list[tuple[str, float]], num_threads: int | None = None, dtype: str = "auto",
                 device: str = "auto", max_batch_rows: int = 64) -> None:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        super().__init__(load_values(terms, dtype, device, max_batch_rows))


class RemoteValue:
    """Value actors as a `ValueFunction` inside another actor: each call goes to the next replica."""

    def __init__(self, actors: list[Any]) -> None:
        if not actors:
            raise ValueError("RemoteValue needs at least one value actor")
        self.actors = list(actors)
        self.turn = 0

    def _call(self, method: str, *args: Any) -> Any:
        import ray  # only once value actors are attached

        actor = self.actors[self.turn % len(self.actors)]
        self.turn += 1
        return ray.get(getattr(actor, method).remote(*args))

    def values(self, prefixes: list[list[int]]) -> list[float]:
        return self._call("values", prefixes)

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        return self._call("next_values", prefixes, candidates)


class ValueTrainer:
    """Fits one value on given samples; `fit` returns the checkpoint folder as files (name -> bytes)."""

    def __init__(self, policy_path: str, shape: str = "q", backbone: str = "policy", base_path: str | None = None,
                 method: str = "fudge", lr: float = 1e-4, epochs: int = 8, train_batch: int = 32,
                 num_threads: int | None = None, dtype: str = "auto", device: str = "auto", seed: int = 0) -> None:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.policy_path, self.shape, self.backbone, self.base_path = policy_path, shape, backbone, base_path
        self.method, self.lr, self.epochs, self.train_batch, self.seed = method, lr, epochs, train_batch, seed
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.calls = 0

    def info(self) -> dict[str, Any]:
        return {"calls": self.calls, "pid": os.getpid()}

    def fit(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], rewards: list[float],
            heldout: list[bool], end_ids: list[int]) -> dict[str, Any]:
        """Fit on the samples not held out, measure on the rest; {"card": ..., "files": {name: bytes}}."""
        from qsteer.training.value import fit_cached

        self.calls += 1
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "value"
            card = fit_cached(folder, prompt_ids, completion_ids, rewards, heldout, end_ids,
                              policy_path=self.policy_path, shape=self.shape, backbone=self.backbone,
                              base_path=self.base_path, method=self.method, lr=self.lr, epochs=self.epochs,
                              train_batch=self.train_batch, dtype=self.dtype, device=self.device, seed=self.seed)
            files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return {"card": card, "files": files}
