"""The `value=` group: the prefix value V(x, y<t) that value-guided workflows steer by and `train_value` fits.

A value is a scalar head (V of a prefix) or a Q-head (the value of every next token from one
forward), on its own backbone (`backbone: separate`, hosted in value actors with the resources
below) or on the frozen policy's hidden states (`backbone: policy`: only the head is trained, it
rides in the policy actors and tokenwise controlled decoding then costs about one forward per
token). `others` adds more values with their weights: the multi-objective form of controlled
decoding, sum_i w_i V_i. Training keys (`method` ... `seed_prompts`) are read by `workflow=train_value`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from qsteer.config.base import Config, Invalid, NonEmpty, Range, resource
from qsteer.config.resources import Resources


@dataclass(frozen=True)
class ValueTermConfig(Config):
    """One more value of a multi-objective sum: a checkpoint and its weight."""

    path: Annotated[str, NonEmpty()] = "value"
    """A value checkpoint folder (what `workflow=train_value` writes); its files say its shape and backbone."""
    weight: float = 1.0
    """Its weight w_i in sum_i w_i V_i."""


@dataclass(frozen=True)
class ValueConfig(Resources):
    """A prefix value: the scorer of controlled decoding, trained by `workflow=train_value`."""

    path: str | None = None
    """A value checkpoint folder (`workflow=train_value` writes one to RUN_DIR/value); null: none (required
    by workflows that steer by a value)."""
    shape: Literal["scalar", "q"] = "q"
    """`scalar`: V(prefix) from the last hidden state; `q`: Q(s)[z] = V([s, z]) for every next token z from
    one forward. A loaded checkpoint must have this shape."""
    backbone: Literal["policy", "separate"] = "policy"
    """`policy`: a head on the frozen policy's hidden states, riding in the policy actors; `separate`: its own
    transformers model (from `base_path`), in value actors. A loaded checkpoint must have this backbone."""
    weight: float = 1.0
    """The weight of this value in the multi-objective sum (with `others`)."""
    others: tuple[ValueTermConfig, ...] = ()
    """More values, each `{path, weight}`: decoding steers by sum_i w_i V_i (multi-objective CD)."""
    method: Literal["fudge", "cdq"] = "fudge"
    """train_value: `fudge` regresses every prefix of a policy sample on its final reward (CD-FUDGE); `cdq`
    regresses it on the base policy's expected next value, r at the end (CD-Q, needs shape q)."""
    base_path: str | None = None
    """train_value with backbone=separate: the causal LM the value model starts from; null: the policy's."""
    samples_per_prompt: Annotated[int, Range(1)] = 8
    """train_value: completions sampled from the policy per prompt (each scored by the reward)."""
    heldout_fraction: Annotated[float, Range(0, 0.9)] = 0.25
    """train_value: the share of prompts held out to measure the value's correlation with the reward."""
    epochs: Annotated[int, Range(1)] = 8
    """train_value: passes over the training samples."""
    lr: Annotated[float, Range(0, low_open=True)] = 1e-4
    """train_value: AdamW learning rate. A head on the policy's hidden states (SmolLM2: |h| about 650 in L1)
    diverges at 3e-3; 1e-4 learns."""
    train_batch: Annotated[int, Range(1)] = 32
    """train_value: sequences per optimiser step."""
    num_threads: Annotated[int, Range(1)] | None = resource(None)
    """Torch threads per value actor (backbone=separate); null: the node's cores shared by its replicas."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = resource("auto")
    """Value actors' dtype; `auto`: bfloat16 on CUDA, float32 on CPU."""
    device: str = resource("auto")
    """Value actors' torch device; `auto` picks CUDA when present."""
    max_batch_rows: Annotated[int, Range(1)] = resource(64)
    """Prefixes a value actor scores in one forward."""

    def check(self) -> None:
        if self.method == "cdq" and self.shape != "q":
            raise Invalid("method", "=cdq needs value.shape=q: its target is the expected value of every next token")
        if self.others and self.path is None:
            raise Invalid("path", "is required when value.others names more values")
