"""run_job: one job into one run folder.

Checks the config, loads the dataset, resumes from the folder's `results.jsonl`, connects to (or
starts) Ray, builds the role groups the workflow needs, runs the workflow over batches of prompts
and appends each finished record; ends with `summary.json`. Meanwhile `progress.json` and the live
view (`progress.py`), and on Ray its metrics (`cluster/metrics.py`), say how far it is. Tests hand
it in-process role groups instead, and it then runs without Ray.

`dataset=files` streams its records through Ray Data (`streaming.py`) and, like an output folder
given as an fsspec URL (`output_dir`), writes the sharded layout (`results.ShardedResults`): at
most a few batches of records are in the driver at a time, and the summary is a running one.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from qsteer.cache import CachedPolicy, GenerationCache, model_identity
from qsteer.cluster.connect import connect, joins_cluster
from qsteer.cluster.placement import (
    Demand,
    Node,
    Reservation,
    plan_placement,
    ray_nodes,
    reserve,
    role_demands,
)
from qsteer.config import ConfigError, JobConfig, check_config, speculative_config
from qsteer.data import DatasetError, load_dataset
from qsteer.engines import SamplingParams
from qsteer.models import ModelNotFoundError, resolve_model_path
from qsteer.progress import Progress, role_counts
from qsteer.results import ResultsFile, RunFolder, ShardedResults, config_changes, dumps, summarize
from qsteer.rewards import REQUIRED_COLUMNS, is_pass_fail
from qsteer.streaming import FileRecords
from qsteer.training.value import new_folder
from qsteer.workflows import WORKFLOWS, Context, Workflow
from qsteer.workflows.code_search import StageStore


def run_job(cfg: DictConfig, out_dir: str | Path, roles: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one job into `out_dir`; returns the summary.

    `roles` ("policy", "reward": groups with the interfaces of `actors/roles.py`) replaces Ray:
    the job then runs on them, and they stay the caller's.
    """
    started = time.perf_counter()
    job = check_config(cfg)
    records: list[dict] | FileRecords
    if cfg.dataset.name == "files":  # listed now (a wrong path fails here), read once Ray is up
        d = cfg.dataset
        records = FileRecords(d.path, d.format, d.limit, check=record_problem(cfg))
        check_job(cfg, None)
    else:
        records = load_dataset(cfg.dataset.name, path=cfg.dataset.path, limit=cfg.dataset.limit)
        check_job(cfg, records)
    if job.cluster.dry_run:
        return dry_run(cfg, job.cluster.placement)
    folder = RunFolder(cfg.get("output_dir") or out_dir)
    folder.make()
    # a URL output's stage files and trained models stay in the local run folder (Hydra's), when there is one
    local = folder.local or (None if "://" in str(out_dir) else Path(out_dir))
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    with lock_run_folder(local) if local is not None else nullcontext():
        return _run_in(folder, cfg, records, roles, started, job, local)


def sharded_layout(cfg: DictConfig) -> bool:
    """Whether the run writes `results/part-NNNNN.jsonl` (dataset=files, or an fsspec URL output) rather
    than `results.jsonl` (`results.ShardedResults` says why there are two)."""
    return cfg.dataset.name == "files" or "://" in str(cfg.get("output_dir") or "")


def _run_in(folder: RunFolder, cfg: DictConfig, records: list[dict] | FileRecords, roles: dict[str, Any] | None,
            started: float, job: JobConfig, out_dir: Path | None) -> dict[str, Any]:
    """`out_dir`: the local folder for stage files and trained models, or none (a URL output alone)."""
    placement = job.cluster.placement
    if sharded_layout(cfg) or folder.local is None:
        results = ShardedResults(folder, job.shard_records, job.shard_flush_s)
    else:
        results = ResultsFile(folder.local / "results.jsonl")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    old_config = folder.read_text("config.yaml")
    if results.done_ids and old_config is not None:
        changes = config_changes(yaml.safe_load(old_config), resolved)
        if changes:
            raise ConfigError(
                f"{folder} holds results of a different config, so resuming would mix them "
                f"({'; '.join(changes)}); choose another hydra.run.dir"
            )
    folder.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    retried = results.drop_errors()  # a record that ended in an error is redone, never kept beside its redo
    streamed = isinstance(records, FileRecords)
    todo: Iterable[dict] = [] if streamed else [r for r in records if r["id"] not in results.done_ids]
    total: int | None = None if streamed else len(records)
    done = 0 if streamed else len(records) - len(todo)
    workflow = WORKFLOWS[cfg.workflow.name]
    needed = needed_roles(cfg)
    draft = speculative_config(cfg)

    own_roles = roles is None
    trained: dict[str, Any] | None = None
    started_ray, stopped, previous = False, None, None
    ready = finished = cache_counts = actors = None
    reservation = Reservation()
    failures: list[str] = []
    replica_calls: list[int] = []
    # progress.json is rewritten every second: it stays in the local run folder (none for a bare URL)
    progress = Progress(None if out_dir is None else out_dir / "progress.json", workflow=cfg.workflow.name,
                        total=total, done=done, show=bool(cfg.progress)).start()
    ended = "failed"
    restarted = 0
    ignored: dict[int, Any] = {}
    try:
        if own_roles:
            roles = {}
            local = not joins_cluster(cfg.cluster.address)
            if (todo or streamed) and local:
                check_local_resources(cfg, needed, draft)
            if local:
                # Convert the default model once here, not in every replica, and fail before Ray starts.
                if "policy" in needed or "baseline_trainer" in needed:
                    resolve_model_path(cfg.model.path)
                if "baseline" in needed:
                    resolve_model_path(cfg.baseline.path)
            started_ray = connect(cfg.cluster)
            previous = _stop_on_sigterm()  # after ray.init, whose own handler would exit at once
            metrics = ray_metrics(cfg.workflow.name, str(folder))
            if metrics is not None:
                progress.sinks.append(metrics)
        elif streamed:
            started_ray = connect(cfg.cluster)  # Ray Data reads on Ray, even when the roles are in-process
        if streamed:
            if cfg.dataset.check_first:  # every record checked before any actor starts, in one streaming pass
                total, remaining = records.scan(results.done_ids)
                done = total - remaining
                progress.total, progress.resumed = total, done
            if total is None or done < total:  # the live set: ids written meanwhile are skipped too
                todo = records.records(skip=results.done_ids)
        has_work = (total is None or done < total) if streamed else bool(todo)
        if own_roles:
            if has_work:
                # refuse a plan the cluster cannot hold before any actor starts: Ray would wait forever
                plan = plan_placement(demands(cfg, needed, draft, has_gpu()), placement, ray_nodes())
                warm = warm_groups(cfg, placement) if cfg.cluster.warm else None
                reserve(plan, placement, into=reservation, warm=warm)
                build_roles(needed, cfg, draft, into=roles, scheduling=reservation.strategies)
        ctx = context(cfg, roles, draft, out_dir)  # waits for the policy replicas to load
        # a warm replica counts the calls of earlier runs too, and a restarted one counts from 0
        replicas_before = ctx.policy.info() if ctx.policy is not None else []
        ready = time.perf_counter()
        progress.watch(role_counts(roles))
        failures = run_batches(workflow, todo, ctx, results, cfg, progress)
        progress.batches_done()
        if workflow.finish is not None and not failures:
            trained = workflow.finish(results.read(), ctx)
            with new_folder(out_dir / "value") as tmp:
                for name, data in trained["files"].items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / name).write_bytes(data)
        finished = time.perf_counter()
        if ctx.policy is not None:
            replica_calls, restarted = replica_counts(replicas_before, ctx.policy.info())
        cache_counts = ctx.policy.counts() if isinstance(ctx.policy, CachedPolicy) else None
        if own_roles:
            actors = {role: n for role, group in roles.items() if (n := _started(group)) is not None}
            if ctx.policy is not None:
                actors["policy_pids"] = [info["pid"] for info in ctx.policy.info()]
        ended = "finished"
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM through the CLI's handler: keep what finished
        stopped, ended = err, "stopped"
        ignored = _ignore_signals()  # a second Ctrl-C must not cut the cleanup short and orphan Ray's processes
    finally:
        try:
            results.close()  # the sharded layout's open shard: what finished before a stop is kept
        finally:
            progress.close(ended)  # before Ray goes: the last snapshot reaches its metrics too
            if own_roles:
                for group in (roles or {}).values():
                    group.shutdown()
                if reservation.groups:
                    reservation.shutdown()
            if started_ray and not (cfg.cluster.warm and stopped is None):
                # a warm local Ray stays up for the next run in this process (a -m sweep's next point) and
                # ends with the process
                import ray

                ray.shutdown()
            # Restored, not left ignored: a process that calls run_job again (a test, a notebook) would
            # otherwise ignore Ctrl-C from then on, and so would every child it starts (SIG_IGN is inherited).
            for signum, handler in ignored.items():
                signal.signal(signum, handler)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    summary = summarize(
        cfg.workflow.name, results.read(), wall_s=time.perf_counter() - started, new_tokens=results.new_tokens,
        startup_s=None if ready is None else ready - started,
        generation_s=None if finished is None else finished - ready,
        pass_fail=is_pass_fail(cfg.reward.name, cfg.reward.target), unfinished=failures,
        policy_replica_calls=replica_calls, vendi=bool(cfg.workflow.get("vendi", False)),
    )
    if retried:
        summary["metrics"]["retried_errors"] = retried
    if restarted:  # replicas whose process died and that Ray restarted during the run (their calls retried)
        summary["metrics"]["policy_replicas_restarted"] = restarted
    if trained is not None:
        summary["metrics"]["value"] = {"path": str(out_dir / "value"), **trained["card"]}
    if actors is not None:  # the role actors this run started (each loads its model; warm ones are reused)
        # and the policy replicas' processes
        summary["metrics"]["actors_started"] = actors
    if cache_counts is not None:  # samples served from the cache, samples generated, and their tokens
        summary["metrics"]["generation_cache"] = cache_counts
    if stopped is not None:
        summary["metrics"]["stopped_by"] = signal.Signals(getattr(stopped, "signum", signal.SIGINT)).name
    folder.write_text("summary.json", dumps(summary, indent=2) + "\n")
    if stopped is not None:
        raise stopped
    return summary


class RunFolderBusy(RuntimeError):
    """Another run holds the run folder's lock."""


@contextmanager
def lock_run_folder(out_dir: Path) -> Iterator[None]:
    """Hold the run folder for this run: a second run into it is refused, never mixed in.

    An advisory `flock` on `.qsteer.lock`: the kernel releases it when the process ends however
    it ends, so a crashed run leaves no stale lock to clear by hand.
    """
    handle = open(out_dir / ".qsteer.lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RunFolderBusy(
                f"{out_dir} is in use by another qsteer run ({handle.read().strip() or 'unknown'}); "
                "wait for it to finish or choose another hydra.run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM; Ctrl-C raises KeyboardInterrupt itself)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_sigterm() -> Any:
    """Make SIGTERM unwind the run as Ctrl-C does; returns the handler it replaced (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    return signal.signal(signal.SIGTERM, stop)


def _ignore_signals() -> dict[int, Any]:
    """Ignore SIGINT and SIGTERM (on the main thread); the handlers they had, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}


def replica_counts(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> tuple[list[int], int]:
    """Each policy replica's calls during the run, from its `info()` before and after, and how many
    replicas were restarted: a replica whose process changed (Ray restarted it after its process died)
    counts from zero in its new process, so its calls are those the new process served."""
    calls, restarted = [], 0
    for old, new in zip(before, after, strict=True):
        same = old.get("pid") == new.get("pid")
        calls.append(new["calls"] - (old["calls"] if same else 0))
        restarted += not same
    return calls, restarted


def check_job(cfg: DictConfig, records: list[dict] | None) -> None:
    """Checks that need the dataset or an engine's signature, still before Ray or any model starts.

    `records` None: a streamed dataset, whose records `record_problem` checks as they are read."""
    workflow = WORKFLOWS[cfg.workflow.name]
    if sharded_layout(cfg) and (workflow.finish is not None or workflow.whole_dataset):
        why = "dataset=files" if cfg.dataset.name == "files" else f"output_dir={cfg.output_dir}"
        raise ConfigError(f"workflow={cfg.workflow.name} trains on all records at once, which a streamed, sharded "
                          f"run ({why}) does not hold; use a JSONL dataset (dataset=jsonl) and a local output folder")
    source = cfg.dataset.path or f"dataset={cfg.dataset.name}"
    if cfg.workflow.name == "score" and records is not None:
        missing = [r["id"] for r in records if not isinstance(r.get("completion"), str)]
        if missing:
            raise DatasetError(f"{source}: workflow=score scores given completions, but {len(missing)} record(s) "
                               f"have no string 'completion' (first: {missing[0]!r})")
    for alternatives in REQUIRED_COLUMNS.get(cfg.reward.name, ()) if not cfg.reward.target and records else ():
        missing = [r["id"] for r in records if not any(r.get(name) is not None for name in alternatives)]
        if missing:
            raise DatasetError(f"{source}: reward={cfg.reward.name} needs {' or '.join(map(repr, alternatives))} "
                               f"in every record; {len(missing)} have none (first: {missing[0]!r})")
    if "value" in WORKFLOWS[cfg.workflow.name].roles:
        value_terms(cfg)  # the checkpoints exist and have the configured shape and backbone
    reward_model = OmegaConf.select(cfg, "reward.kwargs.model_path")
    if reward_model:  # a judge's or reward model's folder: a bad path must not read as the policy's
        try:
            resolve_model_path(reward_model)
        except ModelNotFoundError as err:
            raise ConfigError(str(err).replace("model.path=", "reward.kwargs.model_path=", 1)) from None
    if cfg.workflow.name in ("transfer_qstar", "args") and cfg.generation.top_p < 1:
        raise ConfigError(f"workflow={cfg.workflow.name} samples over workflow.top_k candidates; "
                          f"generation.top_p={cfg.generation.top_p} does not apply (set generation.top_p=1)")
    if cfg.workflow.name in ("transfer_qstar", "args") and cfg.generation.speculative:
        raise ConfigError(f"workflow={cfg.workflow.name} runs the guided loop, which does not decode "
                          "speculatively (set generation.speculative=false)")
    if cfg.workflow.name in ("transfer_qstar", "args"):
        on_baseline = OmegaConf.select(cfg, "workflow.logit_model", default="policy") == "baseline"
        key, engine = ("baseline.engine", cfg.baseline.engine) if on_baseline else ("model.engine", cfg.model.engine)
        if engine != "hf":
            raise ConfigError(f"{key}={engine}: workflow={cfg.workflow.name} runs the token-wise guided loop on "
                              f"this model, which runs on the hf engine (set {key}=hf)")
    if cfg.baseline.path != "default" and "baseline" in WORKFLOWS[cfg.workflow.name].needs(cfg.workflow):
        try:
            resolve_model_path(cfg.baseline.path)
        except ModelNotFoundError as err:
            raise ConfigError(str(err).replace("model.path=", "baseline.path=", 1)) from None
    if "policy" in WORKFLOWS[cfg.workflow.name].roles and cfg.model.engine == "hf" and cfg.model.engine_kwargs:
        import inspect

        from qsteer.engines.hf import HFEngine

        # the keys build_roles passes from model.* itself are not engine_kwargs either
        taken = {"self", "path", "dtype", "device", "max_batch_rows", "num_threads", "chat_template",
                 "prefix_cache_tokens"}
        parameters = inspect.signature(HFEngine.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return  # it takes any keyword: nothing to check here
        accepted = set(parameters) - taken
        unknown = sorted(set(cfg.model.engine_kwargs) - accepted)
        if unknown:
            raise ConfigError(f"model.engine_kwargs has {', '.join(unknown)}, which the hf engine does not take "
                              f"(it takes: {', '.join(sorted(accepted)) or 'none'}); engine_kwargs are for "
                              "model.engine=vllm, whose vllm.LLM arguments they are")


def record_problem(cfg: DictConfig) -> Any:
    """What a streamed record lacks for this job (check_job's record checks, one record at a time): a
    function of the record returning the problem, or None."""
    score = cfg.workflow.name == "score"
    columns = REQUIRED_COLUMNS.get(cfg.reward.name, ()) if not cfg.reward.target else ()

    def problem(record: dict) -> str | None:
        if score and not isinstance(record.get("completion"), str):
            return "workflow=score scores given completions, but this record has no string 'completion'"
        for alternatives in columns:
            if not any(record.get(name) is not None for name in alternatives):
                return f"reward={cfg.reward.name} needs {' or '.join(map(repr, alternatives))} in every record"
        return None

    return problem


def needs_value(cfg: DictConfig) -> bool:
    """Whether the workflow scores by a value: blockwise CD with M >= the budget and the reward on finished
    candidates (Best-of-K) scores every candidate by the reward, and the step searches (beam_search, dvts)
    use a value only with workflow.scorer=value."""
    w = cfg.workflow
    if "value" not in WORKFLOWS[w.name].roles:
        return False
    if w.get("scorer", "value") != "value":
        return False
    return not (w.get("mode") == "blockwise" and w.get("score_finished")
                and w.get("block_size", 0) >= cfg.generation.max_new_tokens)


def value_terms(cfg: DictConfig) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The value= group's checkpoints as (path, weight): (heads on the policy, values in value actors).

    Reads only the checkpoints' small files; errors name the key. A workflow that needs no value
    gets none; one that does needs value.path, with the configured shape and backbone.
    """
    from qsteer.values import checkpoint_kind

    v = cfg.value
    if not needs_value(cfg):
        return [], []
    if v.path is None:
        raise ConfigError(f"value.path is required by workflow={cfg.workflow.name}: a value checkpoint folder "
                          "(workflow=train_value writes one to RUN_DIR/value)")
    terms = [("value.path", v.path, float(v.weight))]
    terms += [(f"value.others[{i}].path", t.path, float(t.weight)) for i, t in enumerate(v.others)]
    heads, separate = [], []
    for key, path, weight in terms:
        try:
            shape, backbone = checkpoint_kind(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}={path!r}: {err}") from None
        if key == "value.path" and (shape, backbone) != (v.shape, v.backbone):
            raise ConfigError(f"value.path={path!r} holds a {shape} head on a {backbone} backbone, but "
                              f"value.shape={v.shape} value.backbone={v.backbone}; set them to match it")
        if backbone == "policy" and cfg.model.engine != "hf":
            raise ConfigError(f"{key}={path!r} is a head on the policy's backbone, which rides in the hf engine; "
                              "use model.engine=hf")
        (heads if backbone == "policy" else separate).append((str(Path(path).resolve()), weight))
    return heads, separate


def needed_roles(cfg: DictConfig) -> tuple[str, ...]:
    """The roles to build: the workflow's, plus the policy (the reference) for reward=calibrated, plus a
    candidate group for workflow=win_rate with a candidate model of its own."""
    roles = WORKFLOWS[cfg.workflow.name].needs(cfg.workflow)
    if cfg.reward.name == "calibrated" and "reward" in roles and "policy" not in roles:
        roles = (*roles, "policy")
    if "candidate" in roles and not cfg.workflow.candidate:
        roles = tuple(r for r in roles if r != "candidate")  # the reference itself: the policy group serves it
    return roles


def context(cfg: DictConfig, roles: dict[str, Any], draft: dict | None, out_dir: Path | None = None) -> Context:
    """The workflow's Context over the role groups; with reward=calibrated, the reward role is the base
    reward group calibrated against the policy group's samples (`actors.calibrated`)."""
    policy = roles.get("policy") or roles.get("baseline")  # the model the loop runs on
    info = policy.info()[0] if policy is not None else {}
    if policy is not None and cfg.generation_cache:
        m = cfg.model
        # the driver of a joined cluster need not hold the weights: the path names them there
        identity = model_identity(
            m.path if joins_cluster(cfg.cluster.address) else str(resolve_model_path(m.path)),
            engine=m.engine, dtype=m.dtype, device=m.device,
            engine_kwargs=OmegaConf.to_container(m.engine_kwargs, resolve=True))
        policy = CachedPolicy(policy, GenerationCache(cfg.generation_cache, identity))
    ctx = Context(
        workflow=cfg.workflow,
        params=SamplingParams(
            max_new_tokens=cfg.generation.max_new_tokens,
            temperature=cfg.generation.temperature,
            top_p=cfg.generation.top_p,
            top_k=cfg.generation.top_k,
            stop=list(cfg.generation.stop),
            seed=cfg.seed,
            speculative=draft,
        ),
        # the policy group as the workflow sees it (through the generation cache when one is set); None
        # when the loop runs on the baseline alone (transfer_qstar with logit_model=baseline)
        policy=policy if roles.get("policy") is not None else None,
        reward=roles.get("reward"),
        sandbox=roles.get("sandbox"),
        stages=None if out_dir is None else StageStore(Path(out_dir) / "stages"),
        baseline=roles.get("baseline"),
        baseline_reward=roles.get("baseline_reward"),
        baseline_trainer=roles.get("baseline_trainer"),
        reward_name=cfg.reward.target or cfg.reward.name,
        candidate=roles.get("candidate", policy if "candidate" in WORKFLOWS[cfg.workflow.name].roles else None),
        chat=bool(cfg.model.chat_template),
        value=roles.get("value"),
        trainer=roles.get("trainer"),
        eos_token_ids=list(info.get("eos_token_ids", [])),
        value_config=cfg.value,
        out_dir=out_dir,
        **({"context_length": info["context_length"]} if policy is not None else {}),
    )
    if cfg.reward.name == "calibrated" and ctx.reward is not None:
        ctx.reward = calibrated_reward(cfg, ctx.reward, policy, ctx.params, ctx.chat)
    return ctx


def calibrated_reward(cfg: DictConfig, base: Any, reference: Any, params: SamplingParams, chat: bool) -> Any:
    """The reward role of reward=calibrated: `base` (the base reward's group) calibrated against
    samples of `reference` (the policy group), with the on-disk cache keyed by everything that fixes
    a prompt's reference scores."""
    import json

    from qsteer.actors.calibrated import CalibratedRewardGroup
    from qsteer.config.base import build_checked
    from qsteer.config.groups import CalibratedRewardConfig
    from qsteer.models import cache_dir
    from qsteer.rewards.calibrated import ReferenceCache

    if reference is None:
        raise ConfigError("reward=calibrated needs the policy (the reference) to sample from; none was built")
    r = build_checked(CalibratedRewardConfig, OmegaConf.to_container(cfg.reward, resolve=True), "reward")
    cache = ReferenceCache(
        folder=r.cache or cache_dir() / "calibrated",
        model=f"{cfg.model.path}:{cfg.model.engine}:{cfg.model.dtype}",
        reward=json.dumps({"base": r.base, "target": r.target, "kwargs": r.kwargs}, sort_keys=True, default=str),
        sampling={"max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                  "top_k": params.top_k, "stop": list(params.stop), "chat": chat},
        seed=params.seed,
    )
    return CalibratedRewardGroup(base, reference, params, num_reference=r.num_reference, transform=r.transform,
                                 t=r.resolved_t(), chat=chat, cache=cache)


def ray_metrics(workflow: str, out_dir: Path | str) -> Any:
    """The progress sink that records Ray metrics; none (and a line saying why) where Ray cannot take them."""
    from qsteer.cluster.metrics import RayMetrics

    try:
        return RayMetrics(workflow, str(out_dir))
    except Exception as err:  # e.g. a Ray Client driver (ray://), which holds no core worker to record with
        print(f"qsteer: no Ray metrics for this run: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def run_batches(workflow: Workflow, todo: Iterable[dict], ctx: Context, results: ResultsFile | ShardedResults,
                cfg: DictConfig, progress: Progress) -> list[str]:
    """Run the workflow over batches, appending records as each batch finishes; the failed batches.

    `todo` may be a list or a stream (dataset=files): batches are cut from it as replicas free up,
    at most two per replica waiting, so the driver holds a few batches, never the dataset."""
    size = max(1, len(todo)) if workflow.whole_dataset else cfg.batch_size
    batches = batched(todo, size)
    failures: list[str] = []
    loop = ctx.policy if ctx.policy is not None else ctx.baseline
    lanes = max(1, len(loop) if loop is not None else len(ctx.reward) if ctx.reward is not None else 1)
    # One thread per replica keeps every replica busy; records are written as batches finish.
    pool = ThreadPoolExecutor(max_workers=lanes)
    pending: dict[Any, list[dict]] = {}

    def submit() -> None:
        while len(pending) < 2 * lanes and (batch := next(batches, None)) is not None:
            pending[pool.submit(workflow.run, batch, ctx)] = batch

    try:
        submit()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                batch = pending.pop(future)
                written = 0
                try:
                    for row in future.result():
                        results.append(row)
                        progress.advance([row])
                        written += 1
                except Exception as err:  # a dead actor or similar: left for a rerun to retry
                    failures.append(f"{[r['id'] for r in batch]}: {type(err).__name__}: {err}")
                    progress.advance(failed=len(batch) - written)
            submit()
    finally:
        # On a stop, batches not started are dropped and running ones are not waited for: their
        # calls end when the caller shuts the role groups down, and a rerun redoes them.
        pool.shutdown(wait=False, cancel_futures=True)
    return failures


def batched(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Lists of `size` records (the last one shorter), cut lazily from a list or a stream."""
    it = iter(records)
    while batch := list(islice(it, size)):
        yield batch


def check_local_resources(cfg: DictConfig, roles: tuple[str, ...], draft: dict | None) -> None:
    """Refuse, before Ray starts, actors that the local Ray cannot place: Ray would wait for them forever."""
    groups = []  # (role, config prefix, its config): each group asks replicas x num_cpus and num_gpus
    if "policy" in roles:
        groups.append(("model", "model", cfg.model))
        if draft is not None and draft["kind"] == "model" and not draft.get("colocate", True) \
                and cfg.model.engine == "hf":
            groups.append(("draft", "draft.actor", cfg.draft.actor))
    if "candidate" in roles:
        groups.append(("candidate", "model", cfg.model))  # built with the policy's resources
    if "reward" in roles:
        groups.append(("reward", "reward", cfg.reward))
    if "value" in roles and value_terms(cfg)[1]:
        groups.append(("value", "value", cfg.value))
    if "trainer" in roles:
        from types import SimpleNamespace

        v = cfg.value
        groups.append(("trainer", "value", SimpleNamespace(replicas=1, num_cpus=v.num_cpus, num_gpus=v.num_gpus)))
    if "sandbox" in roles:
        groups.append(("sandbox", "sandbox", cfg.sandbox))
    if "baseline" in roles:
        groups.append(("baseline", "baseline", cfg.baseline))
    if "baseline_reward" in roles:
        groups.append(("baseline reward", "baseline.reward", cfg.baseline.reward))
    if "baseline_trainer" in roles:
        groups.append(("baseline trainer", "model", cfg.model))
    cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    where = f"cluster.num_cpus={cpus}" if cfg.cluster.num_cpus else f"this machine's {cpus} cores"
    for role, key, group in groups:
        if group.num_cpus > cpus:
            raise ConfigError(f"{key}.num_cpus={group.num_cpus}: one {role} actor needs more CPUs than the local "
                              f"Ray has ({where}); lower {key}.num_cpus or raise cluster.num_cpus")
    total = sum(group.replicas * group.num_cpus for _, _, group in groups)
    if total > cpus:
        parts = ", ".join(f"{role}: {key}.replicas={group.replicas} x {key}.num_cpus={group.num_cpus}"
                          for role, key, group in groups if group.num_cpus)
        raise ConfigError(f"the actors need {total:g} CPUs ({parts}) but the local Ray has {where}; "
                          "lower a role's replicas or num_cpus, or raise cluster.num_cpus")
    asked = {key: group.replicas * group.num_gpus for _, key, group in groups if group.num_gpus not in ("auto", 0)}
    if asked:
        import torch

        gpus = torch.cuda.device_count()
        if sum(asked.values()) > gpus:
            raise ConfigError(f"the actors ask for {sum(asked.values()):g} GPUs "
                              f"({', '.join(f'{k}.num_gpus x replicas: {n:g}' for k, n in asked.items())}) but "
                              f"this machine has {gpus}; set num_gpus to auto or lower it")


def build_roles(roles: tuple[str, ...], cfg: DictConfig, draft: dict | None = None,
                into: dict[str, Any] | None = None, scheduling: dict[str, list] | None = None) -> dict[str, Any]:
    """The Ray groups of the roles a workflow needs, with resources from the config, each replica in its
    placement group bundle where `scheduling` (role -> strategy per replica, from `placement.reserve`) says.

    Each group goes into `into` as soon as it exists, so a failure or a stop while later ones
    start still leaves the caller every group to shut down.
    """
    import ray

    from qsteer.actors.group import ActorGroup, attach_drafts
    from qsteer.actors.policy import PolicyActor
    from qsteer.actors.reward import RewardActor
    from qsteer.actors.roles import BaselineTrainerGroup, PolicyGroup, RewardGroup, ValueSum

    groups: dict[str, Any] = {} if into is None else into
    scheduling = scheduling or {}
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    heads, separate = value_terms(cfg) if "value" in roles else ([], [])
    threads_shared = sum(1 for role in ("policy", "baseline") if role in roles)
    if "policy" in roles:
        m = cfg.model
        policy = policy_actors(cfg, m.path, has_gpu, draft, scheduling=scheduling.get("policy"),
                               threads_shared=threads_shared, **({"value_heads": heads} if heads else {}))
        groups["policy"] = PolicyGroup(policy)
        if draft is not None and draft["kind"] == "model" and not draft.get("colocate", True) and m.engine == "hf":
            groups["draft"] = build_draft_group(cfg, has_gpu, scheduling.get("draft"))
            attach_drafts(policy, groups["draft"])
    if "candidate" in roles:
        # a second policy-like role: the same engine and resources as model=, another model path
        groups["candidate"] = PolicyGroup(policy_actors(cfg, cfg.workflow.candidate, has_gpu, None, role="candidate",
                                                        scheduling=scheduling.get("candidate")))
    if separate:
        value_group = build_value_group(cfg, separate, has_gpu)
        groups["value"] = ValueSum(groups["policy"] if heads else None, value_group)
        ray.get([actor.attach_value.remote(value_group.replicas.actors) for actor in policy.actors])
    elif heads:
        groups["value"] = ValueSum(groups["policy"], None)
    if "trainer" in roles:
        groups["trainer"] = build_trainer_group(cfg, has_gpu)
    if "baseline" in roles:
        b = cfg.baseline
        num_gpus = (1 if has_gpu else 0) if b.num_gpus == "auto" else b.num_gpus
        threads = b.num_threads
        if threads is None and not joins_cluster(cfg.cluster.address) and not num_gpus:
            threads = max(1, (os.cpu_count() or 1) // (b.replicas * threads_shared))
        groups["baseline"] = PolicyGroup(ActorGroup(
            PolicyActor, role="baseline", replicas=b.replicas, num_cpus=b.num_cpus, num_gpus=num_gpus,
            max_restarts=b.max_restarts, engine=b.engine, num_threads=threads, path=b.path, dtype=b.dtype,
            device=b.device, max_batch_rows=b.max_batch_rows, chat_template=cfg.model.chat_template,
            **({"prefix_cache_tokens": b.prefix_cache_tokens} if b.engine == "hf" else {}),
            **OmegaConf.to_container(b.engine_kwargs, resolve=True),
        ))
    for role, r in (("reward", cfg.reward), ("baseline_reward", cfg.baseline.reward)):
        if role not in roles:
            continue
        groups[role] = RewardGroup(ActorGroup(
            RewardActor,
            role=role,
            replicas=r.replicas,
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            max_restarts=r.max_restarts,
            scheduling=scheduling.get(role),
            warm=cfg.cluster.warm,
            name=r.base if r.name == "calibrated" else r.name,
            target=r.target,
            kwargs=OmegaConf.to_container(r.kwargs, resolve=True),
        ))
    if "sandbox" in roles:
        from qsteer.actors.roles import SandboxGroup
        from qsteer.actors.sandbox import Sandbox

        b = cfg.sandbox
        groups["sandbox"] = SandboxGroup(ActorGroup(
            Sandbox,
            role="sandbox",
            replicas=b.replicas,
            num_cpus=b.num_cpus,
            num_gpus=0 if b.num_gpus == "auto" else b.num_gpus,
            max_restarts=b.max_restarts,
            timeout_s=b.timeout_s,
            memory_mb=b.memory_mb,
            max_processes=b.max_processes,
            workers=b.workers,
        ), cache_size=b.cache_size)
    if "baseline_trainer" in roles:
        from qsteer.actors.baseline_trainer import BaselineTrainer

        m = cfg.model
        num_gpus = (1 if has_gpu else 0) if m.num_gpus == "auto" else m.num_gpus
        groups["baseline_trainer"] = ActorGroup(
            BaselineTrainer, role="baseline_trainer", replicas=1, num_cpus=m.num_cpus, num_gpus=num_gpus, max_restarts=0,
            model_path=m.path, chat_template=m.chat_template,
            num_threads=m.num_threads or (None if num_gpus else os.cpu_count()), dtype=m.dtype, device=m.device,
        )
        groups["baseline_trainer"] = BaselineTrainerGroup(groups["baseline_trainer"])
    return groups


def _value_actor_options(cfg: DictConfig, has_gpu: bool, replicas: int) -> dict[str, Any]:
    v = cfg.value
    num_gpus = (1 if has_gpu else 0) if v.num_gpus == "auto" else v.num_gpus
    threads = v.num_threads
    if threads is None and not joins_cluster(cfg.cluster.address) and not num_gpus:
        threads = max(1, (os.cpu_count() or 1) // replicas)
    return {"num_cpus": v.num_cpus, "num_gpus": num_gpus, "max_restarts": v.max_restarts, "num_threads": threads,
            "dtype": v.dtype, "device": v.device}


def build_value_group(cfg: DictConfig, terms: list[tuple[str, float]], has_gpu: bool):
    """Value actors holding the separate-backbone values (weighted), for workflows and policy actors."""
    from qsteer.actors.group import ActorGroup
    from qsteer.actors.roles import ValueGroup
    from qsteer.actors.value import ValueActor

    v = cfg.value
    return ValueGroup(ActorGroup(ValueActor, role="value", replicas=v.replicas, terms=terms,
                                 max_batch_rows=v.max_batch_rows, **_value_actor_options(cfg, has_gpu, v.replicas)))


def build_trainer_group(cfg: DictConfig, has_gpu: bool):
    """One actor that fits the value (workflow=train_value), with the value= group's resources."""
    from qsteer.actors.group import ActorGroup
    from qsteer.actors.roles import TrainerGroup
    from qsteer.actors.value import ValueTrainer

    v = cfg.value
    return TrainerGroup(ActorGroup(
        ValueTrainer, role="trainer", replicas=1, policy_path=resolve_model_path(cfg.model.path), shape=v.shape,
        backbone=v.backbone, base_path=v.base_path, method=v.method, lr=v.lr, epochs=v.epochs,
        train_batch=v.train_batch, seed=cfg.seed, **_value_actor_options(cfg, has_gpu, 1)))


def policy_actors(cfg: DictConfig, path: str, has_gpu: bool, draft: dict | None, role: str = "model",
                  scheduling: list | None = None, threads_shared: int = 1, **extra: Any) -> Any:
    """Ray actors hosting `path` with model='s engine and resources (the policy, or win_rate's candidate);
    on a local CPU run the cores are split over the replicas of `threads_shared` such roles."""
    from qsteer.actors.group import ActorGroup
    from qsteer.actors.policy import PolicyActor

    m = cfg.model
    engine_kwargs = OmegaConf.to_container(m.engine_kwargs, resolve=True)
    if draft is not None and m.engine == "vllm":
        engine_kwargs["speculative"] = draft  # vLLM fixes its speculative_config at engine start
    # vLLM with tensor parallelism places its own GPU workers (Ray actors in a placement group
    # of tensor_parallel_size bundles, distributed_executor_backend="ray"): the actor needs none.
    own_gpu = has_gpu and not (m.engine == "vllm" and int(engine_kwargs.get("tensor_parallel_size", 1)) > 1)
    num_gpus = (1 if own_gpu else 0) if m.num_gpus == "auto" else m.num_gpus
    threads = m.num_threads
    if threads is None and not joins_cluster(cfg.cluster.address) and not num_gpus:
        threads = max(1, (os.cpu_count() or 1) // (m.replicas * threads_shared))
    policy = ActorGroup(
        PolicyActor,
        role=role,
        replicas=m.replicas,
        num_cpus=m.num_cpus,
        num_gpus=num_gpus,
        max_restarts=m.max_restarts,
        scheduling=scheduling,
        warm=cfg.cluster.warm,
        engine=m.engine,
        num_threads=threads,
        path=path,
        dtype=m.dtype,
        device=m.device,
        max_batch_rows=m.max_batch_rows,
        chat_template=m.chat_template,
        **({"prefix_cache_tokens": m.prefix_cache_tokens} if m.engine == "hf" else {}),
        **extra,
        **engine_kwargs,
    )
    return policy


def build_draft_group(cfg: DictConfig, has_gpu: bool, scheduling: list | None = None):
    """Draft actors for a model draft that does not live inside the policy actors."""
    from qsteer.actors.draft import DraftActor
    from qsteer.actors.group import ActorGroup

    a = cfg.draft.actor
    num_gpus = (1 if has_gpu else 0) if a.num_gpus == "auto" else a.num_gpus
    threads = a.num_threads
    if threads is None and not joins_cluster(cfg.cluster.address) and not num_gpus:
        threads = os.cpu_count() or 1  # drafting and verifying alternate, so each may use every core
    return ActorGroup(
        DraftActor, role="draft", replicas=a.replicas, num_cpus=a.num_cpus, num_gpus=num_gpus,
        max_restarts=a.max_restarts, scheduling=scheduling, warm=cfg.cluster.warm, num_threads=threads, path=cfg.draft.path or cfg.model.path,
        dtype=a.dtype, device=a.device, chat_template=cfg.model.chat_template,
    )


def warm_groups(cfg: DictConfig, placement: tuple) -> dict[int, Any]:
    """Per placement group, the config its warm actors are made from (their roles' groups, the value heads
    riding in the policy, the draft): what names its detached placement group (`placement.warm_group_name`)."""
    sections = {"policy": ("model", "value", "draft"), "draft": ("draft",), "reward": ("reward",)}
    def plain(key: str) -> Any:
        node = cfg.get(key)
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node

    return {index: {key: plain(key) for role in group.roles for key in sections[role]}
            for index, group in enumerate(placement)}


def _started(group: Any) -> int | None:
    """How many actors a role group started this run (None for groups that start none themselves)."""
    return getattr(getattr(group, "replicas", group), "started", None)


def demands(cfg: DictConfig, roles: tuple[str, ...], draft: dict | None, gpu: bool) -> list[Demand]:
    """Every actor the run starts, for the placement plan: the policy, draft and reward roles, and (placed
    freely) the value= group's actors (separate-backbone values; workflow=train_value's trainer) and the
    sandbox pool."""
    out = role_demands(cfg, roles, draft, gpu)
    v = cfg.get("value")
    if v is not None and ("trainer" in roles or ("value" in roles and value_terms(cfg)[1])):
        gpus = float((1 if gpu else 0) if v.num_gpus == "auto" else v.num_gpus)
        if "value" in roles and value_terms(cfg)[1]:
            out.append(Demand("value", v.replicas, float(v.num_cpus), gpus))
        if "trainer" in roles:
            out.append(Demand("trainer", 1, float(v.num_cpus), gpus))
    if "candidate" in roles:  # win_rate's candidate model: the policy's resources
        m = cfg.model
        out.append(Demand("candidate", m.replicas, float(m.num_cpus),
                          float((1 if gpu else 0) if m.num_gpus == "auto" else m.num_gpus)))
    if "baseline" in roles:  # Transfer Q*'s aligned model, its reward and align_baseline's trainer
        b = cfg.baseline
        out.append(Demand("baseline", b.replicas, float(b.num_cpus),
                          float((1 if gpu else 0) if b.num_gpus == "auto" else b.num_gpus)))
    if "baseline_reward" in roles:
        r = cfg.baseline.reward
        out.append(Demand("baseline_reward", r.replicas, float(r.num_cpus),
                          float((1 if gpu else 0) if r.num_gpus == "auto" else r.num_gpus)))
    if "baseline_trainer" in roles:
        m = cfg.model
        out.append(Demand("baseline_trainer", 1, float(m.num_cpus),
                          float((1 if gpu else 0) if m.num_gpus == "auto" else m.num_gpus)))
    if "sandbox" in roles:  # as build_roles gives them: no GPU unless asked
        b = cfg.sandbox
        out.append(Demand("sandbox", b.replicas, float(b.num_cpus), float(0 if b.num_gpus == "auto" else b.num_gpus)))
    return out


def has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def dry_run(cfg: DictConfig, placement: tuple) -> dict[str, Any]:
    """Print the placement plan and whether the cluster holds it; start no actor, load no model.

    A run that would start a local Ray plans on this machine without starting it; one that joins
    a cluster reads the cluster's nodes. A plan it cannot hold raises PlacementError naming the role.
    """
    workflow = WORKFLOWS[cfg.workflow.name]
    draft = speculative_config(cfg)
    if joins_cluster(cfg.cluster.address):
        import ray

        started = connect(cfg.cluster)
        try:
            nodes = ray_nodes()
        finally:
            if started:
                ray.shutdown()
    else:
        import torch

        cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
        nodes = [Node("local", "this machine", {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())})]
    gpu = any(n.resources.get("GPU", 0) > 0 for n in nodes)
    plan = plan_placement(demands(cfg, workflow.roles, draft, gpu), placement, nodes)
    print(f"qsteer dry run: workflow={cfg.workflow.name}; no actor started, no model loaded")
    print(plan.table())
    return {"dry_run": True, "fits": True, "plan": plan.rows()}
