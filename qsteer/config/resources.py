"""The resource keys every role shares (policy, reward, draft actors): what its actors get from Ray.

All of them are resources (`qsteer.config.base.resource`): changing them moves a run, never
changes what it writes. The YAML options inherit them from `conf/_shared/resources.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from qsteer.config.base import Config, Range, resource


@dataclass(frozen=True)
class Resources(Config):
    """What one role's actors get from Ray; shared by the policy, the reward and the draft actors."""

    replicas: Annotated[int, Range(1)] = resource(1)
    """Actors of this role; calls are spread over them."""
    num_cpus: Annotated[float, Range(0)] = resource(1)
    """CPUs Ray reserves per actor."""
    num_gpus: Annotated[float, Range(0, 1024)] | Literal["auto"] = resource("auto")
    """GPUs Ray reserves per actor; `auto`: 1 when the cluster has GPUs, else 0."""
    max_restarts: Annotated[int, Range(-1)] = resource(2)
    """Times Ray restarts a dead actor (-1: always); its calls are retried, and each is idempotent."""
