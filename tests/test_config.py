"""Typed configs: the YAML mirrors the dataclasses, every bad key is refused by name before anything
starts, `qsteer --help` and the README come from the field docstrings, resources never block a resume.

Fast: no model, no Ray; the packaged config is composed as the `qsteer` command composes it.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from qsteer.config import (
    DRAFT_CONFIGS,
    DRAFT_GROUPS,
    GROUPS,
    WORKFLOW_CONFIGS,
    ConfigError,
    DatasetConfig,
    GenerationConfig,
    Invalid,
    JobConfig,
    Resources,
    RewardConfig,
    check_config,
    load_config,
    resource_keys,
    speculative_config,
)
from qsteer.config.base import build, defaults, field_docs, type_hints
from qsteer.config.draft import DraftActorConfig, ModelDraftGroup
from qsteer.config.groups import DATASET_CONFIGS
from qsteer.config.help import composed, help_text, markdown, option_doc, options, print_help, readme_table
from qsteer.config.job import CONF_DIR, group_class
from qsteer.results import config_changes, flatten

ROOT = Path(__file__).resolve().parent.parent
# Until the decoding layer exports one dataclass per drafter kind, every kind shares one whose
# fields are the union of all kinds'; each draft YAML then holds only its kind's part.
SHARED_DRAFT_CLASS = len(set(DRAFT_CONFIGS.values())) == 1
# what an option needs from the command (`???` in its YAML, or refused when left null)
REQUIRED = {("reward", "callable"): {"target": "qsteer.rewards:build_reward"},
            ("reward", "model"): {"kwargs.model_path": "reward-model-folder"},
            ("dataset", "jsonl"): {"path": "prompts.jsonl"}, ("dataset", "files"): {"path": "prompts/"}}
UNSET = {("reward", "model"): {"kwargs.model_path"}, ("dataset", "jsonl"): {"path"}, ("dataset", "files"): {"path"}}
OPTIONS = [(group, option) for group in GROUPS for option in options(group)]


def yaml_keys(node: dict, cls: type, path: str = "") -> set[str]:
    """A YAML node's dotted keys, descending where the dataclass nests a config."""
    hints, out = type_hints(cls), set()
    for key, value in node.items():
        nested = hints.get(key)
        if isinstance(value, dict) and dataclasses.is_dataclass(nested):
            out |= yaml_keys(value, nested, f"{path}{key}.")
        else:
            out.add(path + key)
    return out


def field_keys(cls: type, path: str = "") -> set[str]:
    hints, out = type_hints(cls), set()
    for f in dataclasses.fields(cls):
        nested = hints[f.name]
        out |= field_keys(nested, f"{path}{f.name}.") if dataclasses.is_dataclass(nested) else {path + f.name}
    return out


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_yaml_option_holds_exactly_its_dataclass_fields(group, option):
    node = composed(f"{group}={option}")[group]
    cls = group_class(group, node)
    if group == "draft" and SHARED_DRAFT_CLASS:
        assert yaml_keys(node, cls) <= field_keys(cls)
    else:
        assert yaml_keys(node, cls) == field_keys(cls)
    assert {k for k, v in flatten(node).items() if v == "???"} == UNSET.get((group, option), set())
    built = build(cls, set_keys(node, REQUIRED.get((group, option), {})))
    assert isinstance(built, cls)


def test_default_options_and_shared_yaml_equal_the_dataclass_defaults():
    tree = composed()
    job = load_config(tree)
    for group in GROUPS:
        if group == "draft" and SHARED_DRAFT_CLASS:
            continue
        assert getattr(job, group) == getattr(JobConfig(), group), group
    top = {k: v for k, v in tree.items() if k not in GROUPS}
    assert top == {f.name: f.default for f in dataclasses.fields(JobConfig) if f.name not in GROUPS}
    # every workflow's (and, per kind, every draft's) YAML holds its dataclass's defaults
    for name, cls in WORKFLOW_CONFIGS.items():
        assert build(cls, composed(f"workflow={name}")["workflow"]) == cls(), name
    if not SHARED_DRAFT_CLASS:
        for kind, cls in DRAFT_GROUPS.items():
            assert build(cls, composed(f"draft={kind}")["draft"]) == cls(), kind
    # the files options inherit from hold their dataclass's defaults
    shared = {"resources": Resources, "reward": RewardConfig}
    assert {p.stem for p in (CONF_DIR / "_shared").glob("*.yaml")} == set(shared)
    for stem, cls in shared.items():
        own = {k: v for k, v in yaml.safe_load((CONF_DIR / "_shared" / f"{stem}.yaml").read_text()).items()
               if k != "defaults"}
        assert own and all(v == defaults(cls)[k] for k, v in own.items()), stem
    assert yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"][:-1] == [
        {g: options(g)[0]} for g in GROUPS]


def test_every_field_and_class_is_documented():
    classes = [JobConfig, Resources, *(type_hints(JobConfig)[g] for g in GROUPS if g not in ("workflow", "draft")),
               *WORKFLOW_CONFIGS.values(), DraftActorConfig]
    if not SHARED_DRAFT_CLASS:
        classes += DRAFT_GROUPS.values()
    for cls in classes:
        assert option_doc(cls), cls.__name__
        for name, doc in field_docs(cls).items():
            assert doc, f"{cls.__name__}.{name} has no docstring"
    own = field_docs(ModelDraftGroup)
    assert own["colocate"] and own["actor"]


def test_choices_are_the_registries():
    from qsteer.data import DATASETS
    from qsteer.rewards import BUILTIN_REWARDS
    from qsteer.workflows import WORKFLOWS
    from qsteer.workflows.best_of_n import AGGREGATES

    def choices(cls, name):
        return set(typing.get_args(type_hints(cls)[name]))

    assert set(WORKFLOW_CONFIGS) == set(WORKFLOWS) == set(options("workflow"))
    assert set(DRAFT_GROUPS) == set(DRAFT_CONFIGS) == set(options("draft"))
    assert choices(DatasetConfig, "name") == set(DATASETS)
    # dataset=files is no loader of qsteer.data: Ray Data reads it (qsteer/streaming.py)
    assert set(DATASET_CONFIGS) == set(DATASETS) | {"files"} == set(options("dataset"))
    assert choices(RewardConfig, "name") == set(BUILTIN_REWARDS) | {"callable"}
    assert choices(WORKFLOW_CONFIGS["best_of_n"], "aggregate") == set(AGGREGATES)
    speculative = typing.get_args(type_hints(GenerationConfig)["speculative"])
    assert set(typing.get_args(speculative[1])) == set(DRAFT_CONFIGS)
    assert all(choices(cls, "name") == {name} for name, cls in WORKFLOW_CONFIGS.items())


def set_keys(tree: dict, values: dict) -> dict:
    """`tree` with dotted keys set (or added, as `+key=value` does)."""
    for key, value in values.items():
        *parents, last = key.split(".")
        node = tree
        for parent in parents:
            node = node[parent]
        node[last] = value
    return tree


# (group choices, values set on the composed config, the key the error must name)
BAD = [
    ((), {"workflow.n": 0}, "workflow.n"),
    (("workflow=sample",), {"workflow.n": 0}, "workflow.n"),
    (("workflow=speculative",), {"workflow.n": 0}, "workflow.n"),
    (("workflow=speculative",), {"workflow.n": 1.5}, "workflow.n"),
    (("workflow=speculative",), {"workflow.baseline": "maybe"}, "workflow.baseline"),
    ((), {"workflow.aggregate": "best"}, "workflow.aggregate"),
    ((), {"workflow.answer_pattern": "(a"}, "workflow.answer_pattern"),
    ((), {"workflow.typo": 1}, "workflow.typo"),
    (("workflow=score",), {"workflow.n": 2}, "workflow.n"),
    ((), {"workflow.name": "beam"}, "workflow.name"),
    ((), {"typo": 1}, "typo"),
    ((), {"seed": -1}, "seed"),
    ((), {"batch_size": 0}, "batch_size"),
    ((), {"progress": 3}, "progress"),
    ((), {"model.engine": "tgi"}, "model.engine"),
    ((), {"model.path": ""}, "model.path"),
    ((), {"model.dtype": "int4"}, "model.dtype"),
    ((), {"model.replicas": 0}, "model.replicas"),
    ((), {"model.num_gpus": -1}, "model.num_gpus"),
    ((), {"model.num_gpus": "many"}, "model.num_gpus"),
    ((), {"model.typo": 1}, "model.typo"),
    ((), {"generation.max_new_tokens": 0}, "generation.max_new_tokens"),
    ((), {"generation.temperature": -1}, "generation.temperature"),
    ((), {"generation.top_p": 0}, "generation.top_p"),
    ((), {"generation.top_k": -1}, "generation.top_k"),
    ((), {"generation.stop": ["a", ""]}, "generation.stop[1]"),
    ((), {"generation.stop": "\n"}, "generation.stop"),
    ((), {"generation.speculative": "maybe"}, "generation.speculative"),
    (("dataset=jsonl",), {}, "dataset.path"),
    ((), {"dataset.name": "jsonl"}, "dataset.path"),
    ((), {"dataset.limit": -1}, "dataset.limit"),
    (("reward=callable",), {}, "reward.target"),
    (("reward=callable",), {"reward.target": "no_such_module:fn"}, "reward.target"),
    (("reward=callable",), {"reward.target": "qsteer.rewards:BUILTIN_REWARDS"}, "reward.target"),
    (("reward=model",), {}, "reward.kwargs.model_path"),
    ((), {"reward.name": "bleu"}, "reward.name"),
    ((), {"reward.num_cpus": -1}, "reward.num_cpus"),
    ((), {"cluster.num_cpus": 0}, "cluster.num_cpus"),
    ((), {"cluster.typo": 1}, "cluster.typo"),
    (("workflow=speculative",), {"draft.gamma": 0}, "draft.gamma"),
    (("workflow=speculative", "draft=recycle"), {"draft.tree": [[0], [5, 1]]}, "draft.tree"),
    (("workflow=speculative",), {"draft.speed": 3}, "draft.speed"),
    (("draft=model",), {"draft.actor.replicas": 0}, "draft.actor.replicas"),
    (("draft=model",), {"draft.actor.typo": 1}, "draft.actor.typo"),
    (("draft=model",), {"draft.colocate": "sometimes"}, "draft.colocate"),
    ((), {"draft.kind": "medusa"}, "draft.kind"),
]


@pytest.mark.parametrize(("groups", "values", "key"), BAD, ids=[k for _, _, k in BAD])
def test_bad_keys_are_refused_naming_the_key(groups, values, key):
    with pytest.raises(ConfigError) as err:
        check_config(set_keys(composed(*groups), values))
    assert re.match(rf"{re.escape(key)}(?![\w.])", str(err.value)), str(err.value)


def test_messages_say_what_is_wrong():
    def message(*overrides):
        with pytest.raises(ConfigError) as err:
            check_config(composed(*overrides))
        return str(err.value)

    # through Hydra's override parser, as typed on the command line
    assert message("workflow=speculative", "workflow.n=0") == "workflow.n must be an integer >= 1, got 0"
    assert message("model.engine=tgi") == "model.engine='tgi' is not one of: hf, vllm"
    assert message("generation.top_p=0") == "generation.top_p must be a number in (0, 1], got 0"
    assert message("dataset=jsonl") == "dataset.path is required but not set (add `dataset.path=...` to the command)"
    assert message("+workflow.typo=1").startswith(
        "workflow.typo is not a key of workflow=best_of_n; its keys are: name, n, aggregate, answer_pattern")


def test_a_config_checks_itself_when_built_in_code():
    best_of_n = WORKFLOW_CONFIGS["best_of_n"]
    assert best_of_n(n=8).n == 8
    with pytest.raises(Invalid, match=r"^n must be an integer >= 1, got 0$"):
        best_of_n(n=0)
    with pytest.raises(Invalid, match="answer_pattern is not a valid regex"):
        best_of_n(answer_pattern="(")
    assert GenerationConfig(stop=["\n\n"]).stop == ("\n\n",)  # normalised as from YAML


def test_the_typed_tree_and_the_draft_the_policy_uses():
    job = load_config(composed("workflow=speculative", "workflow.n=3", "draft=model", "draft.colocate=false"))
    assert job.workflow.n == 3 and job.workflow.baseline is True
    assert job.draft.actor.replicas == 1 and job.generation.temperature == 1.0
    draft = speculative_config(job)
    assert draft["kind"] == "model" and draft["colocate"] is False and "actor" not in draft
    assert speculative_config(composed()) is None
    other = speculative_config(composed("generation.speculative=recycle"))  # the kind's shipped defaults
    assert other["kind"] == "recycle" and other["topk"] == 8


@pytest.mark.slow  # a fresh interpreter importing the CLI: 8 s
def test_loading_the_config_starts_nothing_heavy():
    # (torch may come in with the decoding layer's draft configs: qsteer.decoding holds its loops too)
    code = ("import sys; from qsteer.config import check_config; from qsteer.config.help import composed; "
            "check_config(composed('workflow=speculative', 'draft=model')); "
            "print(sorted(m for m in ('ray', 'vllm', 'qsteer.workflows', 'qsteer.actors', 'qsteer.engines') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def flat(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_groups_and_documents_every_field():
    top = help_text([])
    for group in GROUPS:
        assert re.search(rf"^  {group}=\s+{re.escape(', '.join(options(group)))}$", top, re.M), group
    for group in GROUPS:
        for option in options(group):
            text = flat(help_text([f"{group}={option}"]))
            node = composed(f"{group}={option}")[group]
            cls = group_class(group, node)
            for name, doc in field_docs(cls).items():
                if name in node and name not in ("name", "kind"):
                    assert f"{group}." in text and flat(doc) in text, (group, option, name)
    speculative = flat(help_text(["workflow=speculative"]))
    assert "workflow.n: int >= 1 = 1" in speculative and "workflow.baseline: bool = true" in speculative
    assert "model.engine: hf | vllm = hf" in flat(help_text(["model"]))


@pytest.mark.slow  # a fresh interpreter importing the CLI: 8 s
def test_qsteer_help_runs_before_hydra(capsys):
    cli = [sys.executable, "-m", "qsteer.cli"]
    proc = subprocess.run([*cli, "--help", "workflow=speculative"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Samples per prompt, all decoded speculatively" in proc.stdout
    assert print_help(["modle"]) == 2
    assert "'modle' is not a config group" in capsys.readouterr().err


def test_readme_config_table_is_generated_from_the_docstrings():
    assert readme_table((ROOT / "README.md").read_text()) == markdown(), (
        "README's config table is stale: run `python -m qsteer.config.help --readme README.md`")


def test_resources_may_change_on_resume_and_nothing_else():
    base = ["workflow=speculative", "draft=model", "workflow.n=2"]
    old = composed(*base)
    moved = composed(*base, "draft.colocate=false", "draft.actor.replicas=2", "draft.actor.num_threads=1",
                     "model.replicas=2", "model.num_gpus=0", "reward.num_cpus=1", "batch_size=3",
                     "cluster.address=auto", "dataset.limit=5", "progress=false")
    assert config_changes(old, moved) == []
    assert config_changes(old, composed(*base[:-1], "workflow.n=3")) == ["workflow.n: 2 -> 3"]
    assert config_changes(old, composed(*base, "draft.gamma=3")) == ["draft.gamma: 5 -> 3"]
    assert config_changes(old, composed(*base, "generation.temperature=0")) == ["generation.temperature: 1.0 -> 0"]
    keys = resource_keys(old)
    assert {"draft.colocate", "draft.actor", "model.replicas", "cluster", "batch_size"} <= set(keys)
    assert not {"workflow.n", "draft.gamma", "draft.path", "model.path", "seed"} & set(keys)
