"""run_job without Ray: the in-process role groups on the tiny model, and the checks before any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsteer.actors.local import local_policy, local_reward
from qsteer.config import ConfigError
from qsteer.data import DatasetError
from qsteer.rewards.sentiment import SentimentReward
from qsteer.run import run_job

FAST = ["dataset.limit=4", "generation.max_new_tokens=8", "batch_size=2"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def roles(tiny_engine):
    return {"policy": local_policy(tiny_engine), "reward": local_reward(SentimentReward())}


def test_in_process_run_writes_the_contract_files_and_resumes(compose, roles, tmp_path):
    summary = run_job(compose("workflow.n=2", *FAST), tmp_path, roles=roles)
    assert (tmp_path / "config.yaml").read_text().startswith("workflow:")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    first = rows(tmp_path)
    assert [r["id"] for r in first] == ["sent-000", "sent-001", "sent-002", "sent-003"]
    assert summary["num_prompts"] == 4 and summary["num_errors"] == 0
    assert summary["generated_tokens"] == sum(c["num_tokens"] for r in first for c in r["candidates"])
    assert summary["metrics"]["policy_replica_calls"] == [2]  # two batches of two prompts
    # throughput is over the time the batches ran; start-up is reported beside it
    assert 0 < summary["startup_s"] and 0 < summary["generation_s"]
    assert summary["startup_s"] + summary["generation_s"] <= summary["wall_s"] + 0.002
    assert summary["tokens_per_s"] == pytest.approx(summary["generated_tokens"] / summary["generation_s"], rel=0.01)
    resumed = run_job(compose("workflow.n=2", *FAST, "dataset.limit=6"), tmp_path, roles=roles)
    assert rows(tmp_path)[:4] == first and resumed["num_prompts"] == 6


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["workflow.n=0"], "workflow.n"),
        (["generation.temperature=-1"], "generation.temperature"),
        (["generation.top_p=0"], "generation.top_p"),
        (["workflow.aggregate=best"], "workflow.aggregate"),
        (["dataset=jsonl"], "dataset.path"),
        (["reward=callable"], "reward.target"),
        (["reward=callable", "reward.target=no_such_module:fn"], "reward.target"),
        (["model.engine=tgi"], "model.engine"),
    ],
)
def test_config_errors_name_the_key_before_anything_loads(compose, tmp_path, overrides, key):
    import ray

    was_running = ray.is_initialized()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_job(compose(*overrides), tmp_path)
    assert ray.is_initialized() == was_running  # failed before connecting to Ray
    assert not (tmp_path / "results.jsonl").exists()


def test_bad_dataset_line_names_file_and_line(compose, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "there"}\n{"id": "c", prompt}\n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl:3"):
        run_job(compose("dataset=jsonl", f"dataset.path={data}"), tmp_path / "out")


def test_a_run_whose_every_record_errs_or_whose_batches_fail_is_failed_with_its_first_errors(
        compose, tiny_engine, tmp_path):
    from reward_fns import always_fails

    from qsteer.actors.local import LocalReplicas
    from qsteer.actors.roles import RewardGroup
    from qsteer.cli import failed

    cfg = compose("workflow.n=2", *FAST)
    down = run_job(cfg, tmp_path / "down", roles={"policy": local_policy(tiny_engine), "reward": local_reward(always_fails)})
    assert down["num_errors"] == down["num_prompts"] == 4
    reasons = failed(down)
    assert reasons[0].startswith("every record has an error")
    assert reasons[1] == "sent-000: ConnectionError: reward service unreachable" and len(reasons) == 5

    class DeadActor:  # what a reward replica that cannot start looks like to the group
        def score(self, *args):
            raise RuntimeError("the actor died before it could serve")

    dead = run_job(cfg, tmp_path / "dead",
                   roles={"policy": local_policy(tiny_engine), "reward": RewardGroup(LocalReplicas([DeadActor()]))})
    assert dead["num_prompts"] == 0 and len(dead["metrics"]["unfinished"]) == 2
    reasons = failed(dead)
    assert reasons[0].startswith("2 batch(es) failed") and "the actor died" in reasons[1]
    healthy = run_job(cfg, tmp_path / "ok", roles={"policy": local_policy(tiny_engine),
                                                   "reward": local_reward(SentimentReward())})
    assert failed(healthy) == []


def test_errored_records_are_retried_on_resume_and_only_they(compose, tiny_engine, tmp_path):
    service = {"up": False}

    def flaky(prompts, completions, **_):
        if not service["up"]:
            raise ConnectionError("reward service unreachable")
        return [float(len(c)) for c in completions]

    def job():
        policy = local_policy(tiny_engine)
        summary = run_job(compose("workflow.n=2", *FAST), tmp_path, roles={"policy": policy, "reward": local_reward(flaky)})
        return summary, policy.info()[0]["calls"]

    first, _ = job()
    assert first["num_errors"] == 4
    service["up"] = True
    second, calls = job()
    assert second["num_errors"] == 0 and second["metrics"]["retried_errors"] == 4
    assert calls == 2  # the four prompts were generated again, in two batches
    assert sorted(r["id"] for r in rows(tmp_path)) == ["sent-000", "sent-001", "sent-002", "sent-003"]
    third, calls = job()
    assert calls == 0 and "retried_errors" not in third["metrics"]
    assert third["mean_reward"] == second["mean_reward"]


def test_a_damaged_line_inside_results_is_named_by_file_and_line(compose, roles, tmp_path):
    from qsteer.results import ResultsError

    run_job(compose(*FAST), tmp_path, roles=roles)
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][:40] + "\n"
    (tmp_path / "results.jsonl").write_text("".join(lines))
    with pytest.raises(ResultsError, match=r"results\.jsonl:2: not a JSON record"):
        run_job(compose(*FAST), tmp_path, roles=roles)
    (tmp_path / "results.jsonl").write_bytes(b"".join(x.encode() for x in lines[:1]) + b'{"id": "\xff"}\n')
    with pytest.raises(ResultsError, match=r"results\.jsonl:2: not UTF-8"):
        run_job(compose(*FAST), tmp_path, roles=roles)


def test_a_second_run_into_a_busy_folder_is_refused(compose, tiny_engine, tmp_path):
    import threading

    from qsteer.run import RunFolderBusy

    scoring, release = threading.Event(), threading.Event()

    def slow(prompts, completions, **_):
        scoring.set()
        assert release.wait(60)
        return [1.0 for _ in completions]

    cfg = compose("workflow.n=2", *FAST)
    first = threading.Thread(target=run_job, args=(cfg, tmp_path),
                             kwargs={"roles": {"policy": local_policy(tiny_engine), "reward": local_reward(slow)}})
    first.start()
    try:
        assert scoring.wait(60)
        with pytest.raises(RunFolderBusy, match=r"in use by another qsteer run \(pid \d+"):
            run_job(cfg, tmp_path, roles={"policy": local_policy(tiny_engine), "reward": local_reward(slow)})
    finally:
        release.set()
        first.join()
    assert [r["id"] for r in rows(tmp_path)] == ["sent-000", "sent-001", "sent-002", "sent-003"]
    assert run_job(cfg, tmp_path, roles={"policy": local_policy(tiny_engine), "reward": local_reward(slow)})


def test_nan_and_infinite_rewards_are_errors_on_their_record_and_never_bare_nan_in_json(
        compose, tiny_engine, tmp_path):
    def broken(prompts, completions, id, **_):
        bad = {"sent-000": float("nan"), "sent-001": float("inf")}
        return [bad.get(i, 0.5) for i in id]

    summary = run_job(compose("workflow.n=2", *FAST), tmp_path,
                      roles={"policy": local_policy(tiny_engine), "reward": local_reward(broken)})

    def refuse(constant):
        raise AssertionError(f"bare {constant} in a JSON file")

    by_id = {r["id"]: r for r in (json.loads(line, parse_constant=refuse)
                                  for line in (tmp_path / "results.jsonl").read_text().splitlines())}
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert by_id["sent-000"]["error"] == "reward is nan (not a finite number)"
    assert by_id["sent-001"]["error"] == "reward is inf (not a finite number)"
    assert by_id["sent-001"]["reward"] is None and by_id["sent-001"]["candidates"][0]["reward"] is None
    assert by_id["sent-002"]["error"] is None and by_id["sent-002"]["reward"] == 0.5
    assert summary["num_errors"] == 2


def test_a_non_utf8_dataset_is_named_by_file_and_line_and_a_byte_order_mark_is_accepted(compose, tmp_path):
    from qsteer.data import load_dataset

    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"latin1\.jsonl:2: not UTF-8"):
        run_job(compose("dataset=jsonl", f"dataset.path={latin}"), tmp_path / "out")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes('{"id": "a", "prompt": "café"}\n{"id": "b", "prompt": "hi"}\n'.encode("utf-8-sig"))
    assert [r["prompt"] for r in load_dataset("jsonl", path=str(bom))] == ["café", "hi"]


def test_errored_samples_are_failures_in_pass_at_k_and_the_mean_of_a_pass_fail_reward(compose, tiny_engine, tmp_path):
    from reward_fns import fails_on_marked_prompts, first_passes_second_crashes

    cfg = compose("workflow.n=2", *FAST, "reward=callable", "reward.target=reward_fns:first_passes_second_crashes")
    summary = run_job(cfg, tmp_path / "code", roles={"policy": local_policy(tiny_engine),
                                                     "reward": local_reward(first_passes_second_crashes)})
    assert summary["num_errors"] == 1
    # one of four prompts passes; the crashed one counts as failed, not as left out (which gives 1/3)
    assert summary["metrics"]["pass@1"] == summary["metrics"]["pass@2"] == summary["mean_reward"] == 0.25
    # rewards that merely happen to be 0 or 1 are not pass/fail: no pass@k
    cfg = compose("workflow.n=2", *FAST, "reward=callable", "reward.target=reward_fns:fails_on_marked_prompts")
    ones = run_job(cfg, tmp_path / "ones", roles={"policy": local_policy(tiny_engine),
                                                  "reward": local_reward(fails_on_marked_prompts)})
    assert ones["mean_reward"] == 1.0 and not any(k.startswith("pass@") for k in ones["metrics"])


@pytest.mark.timeout(120)  # before the check, Ray waited for these actors forever
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_cpus=4"], r"model\.num_cpus=4: one model actor needs more CPUs than the local Ray has "
                               r"\(cluster\.num_cpus=2\)"),
        (["model.replicas=2", "reward=judge"], r"the actors need 3 CPUs \(model: model\.replicas=2 x "
                                               r"model\.num_cpus=1, reward: reward\.replicas=1 x reward\.num_cpus=1\)"),
        (["model.num_gpus=1"], r"model\.num_gpus x replicas: 1\) but this machine has 0"),
    ],
)
def test_resources_the_local_ray_cannot_meet_fail_before_it_starts(compose, tmp_path, overrides, message):
    import ray
    import torch

    if "model.num_gpus=1" in overrides and torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    was_running = ray.is_initialized()
    with pytest.raises(ConfigError, match=message):
        run_job(compose("cluster.num_cpus=2", *FAST, *overrides), tmp_path)
    assert ray.is_initialized() == was_running


@pytest.mark.parametrize(
    ("overrides", "data", "error", "message"),
    [
        (["workflow=score"], {"prompt": "Hi."}, DatasetError,
         r"pairs\.jsonl: workflow=score scores given completions, but 1 record\(s\) have no string 'completion' "
         r"\(first: 'b'\)"),
        (["workflow=score", "reward=code_tests"], {"prompt": "def f():", "completion": "  return 1", "entry_point": "f"},
         DatasetError, r"reward=code_tests needs 'test' or 'tests' in every record; 1 have none \(first: 'b'\)"),
        (["+model.engine_kwargs.gpu_memory_utilization=0.5"], {"prompt": "Hi."}, ConfigError,
         r"model\.engine_kwargs has gpu_memory_utilization, which the hf engine does not take"),
        (["workflow=score", "reward=judge", "reward.kwargs.model_path=/no/such/model"], {"prompt": "Hi.",
         "completion": "Hello."}, ConfigError, r"^reward\.kwargs\.model_path='/no/such/model' does not exist"),
    ],
)
def test_checks_that_need_the_dataset_or_the_engine_run_before_ray(compose, tmp_path, overrides, data, error, message):
    import ray

    good = {"id": "a", "prompt": "def f():", "completion": "  return 1", "test": "def check(c): pass",
            "entry_point": "f"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", **data}) + "\n")
    was_running = ray.is_initialized()
    with pytest.raises(error, match=message):
        run_job(compose("dataset=jsonl", f"dataset.path={path}", *overrides), tmp_path / "out")
    assert ray.is_initialized() == was_running


def test_run_files_get_the_mode_other_files_get(compose, roles, tmp_path):
    import os
    import stat

    umask = os.umask(0o027)  # a group-readable setup, as shared clusters use
    try:
        run_job(compose(*FAST, "dataset.limit=2"), tmp_path, roles=roles)
    finally:
        os.umask(umask)
    for name in ("config.yaml", "results.jsonl", "summary.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
