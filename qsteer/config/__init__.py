"""Typed configs: one dataclass per config group and per workflow; the field docstrings are the docs.

`load_config` turns Hydra's composed config into a checked `JobConfig` before Ray or any model
starts; `qsteer --help` and the README's config table are generated from the same dataclasses
(`qsteer.config.help`). This package imports no Ray, workflow, actor or engine module.
"""

from qsteer.config.base import ConfigError, Invalid, Range, resource
from qsteer.config.draft import DRAFT_CONFIGS, DRAFT_GROUPS
from qsteer.config.groups import (
    BaselineConfig,
    ClusterConfig,
    DatasetConfig,
    GenerationConfig,
    ModelConfig,
    RewardConfig,
)
from qsteer.config.job import (
    GROUPS,
    JobConfig,
    check_config,
    load_config,
    policy_draft,
    resource_keys,
    speculative_config,
)
from qsteer.config.resources import Resources
from qsteer.config.value import ValueConfig, ValueTermConfig
from qsteer.config.workflows import WORKFLOW_CONFIGS, WorkflowConfig

__all__ = [
    "BaselineConfig",
    "DRAFT_CONFIGS",
    "DRAFT_GROUPS",
    "GROUPS",
    "WORKFLOW_CONFIGS",
    "ClusterConfig",
    "ConfigError",
    "DatasetConfig",
    "GenerationConfig",
    "Invalid",
    "JobConfig",
    "ModelConfig",
    "Range",
    "Resources",
    "RewardConfig",
    "ValueConfig",
    "ValueTermConfig",
    "WorkflowConfig",
    "check_config",
    "load_config",
    "policy_draft",
    "resource",
    "resource_keys",
    "speculative_config",
]
