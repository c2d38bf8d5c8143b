"""dataset=files through Ray Data, the sharded results layout and fsspec outputs.

The sharded store and the running summary are checked without Ray; the runs (marked `ray`) score
given completions with the real sentiment reward, so no model loads and each takes seconds.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from qsteer.config import ConfigError
from qsteer.data import DatasetError
from qsteer.results import ResultsError, RunFolder, ShardedResults, summarize
from qsteer.rewards.sentiment import SentimentReward
from qsteer.streaming import list_files

TEXTS = ["I love this, it is wonderful", "This is terrible and sad", "It is a chair", "Great fun, happy ending",
         "Awful, I hate it", "The box is brown", "What a delightful surprise"]


def make_records(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i:03d}", "prompt": f"Review {i}:", "completion": TEXTS[i % len(TEXTS)]}
            for i in range(start, start + n)]


def write_jsonl(path: Path, records: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def shard_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for part in sorted((folder / "results").glob("part-*.jsonl"))
            for line in part.read_text().splitlines()]


def row(i: int, reward: float | None = 0.5, error: str | None = None, tokens: int = 0) -> dict:
    return {"id": f"r{i}", "prompt": "p", "output": "o", "reward": reward, "error": error,
            "candidates": [{"text": "o", "reward": reward, "num_tokens": tokens}],
            "stats": {"generated_tokens": tokens, "prompt_tokens": 3}}


# --- the sharded store and the running summary, without Ray ---------------------------------------------


@pytest.mark.parametrize("where", ["local", "file", "memory"])
def test_shards_are_written_once_and_resume_keeps_each_id_once(tmp_path, where):
    url = {"local": str(tmp_path / "run"), "file": f"file://{tmp_path}/run", "memory": f"memory://{tmp_path.name}/run"}
    folder = RunFolder(url[where])
    folder.make()
    store = ShardedResults(folder, shard_records=3, flush_s=3600)
    for i in range(7):
        store.append(row(i, error="reward service down" if i == 4 else None))
    store.append(row(2))  # an id already written is never written again
    store.close()
    parts = folder.names("results")
    assert parts == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]  # 3 + 3 + the last 1
    before = {name: folder.fs.cat_file(folder.path(f"results/{name}")) for name in parts}

    resumed = ShardedResults(folder, shard_records=3, flush_s=3600)
    assert resumed.done_ids == {f"r{i}" for i in range(7)}
    assert resumed.drop_errors() == 1 and "r4" not in resumed.done_ids  # the errored record is redone
    resumed.append(row(4, reward=0.9))
    resumed.append(row(7))
    resumed.close()
    assert {name: folder.fs.cat_file(folder.path(f"results/{name}")) for name in parts} == before
    final = list(resumed.read())
    assert sorted(r["id"] for r in final) == [f"r{i}" for i in range(8)]  # every id once: the redo, not the error
    assert next(r for r in final if r["id"] == "r4")["reward"] == 0.9
    assert ShardedResults(folder).errored_ids == set()
    if where == "local":
        assert (tmp_path / "run" / "results" / "part-00003.jsonl").exists()


def test_a_shard_is_also_written_when_its_oldest_record_has_waited_flush_s(tmp_path):
    folder = RunFolder(tmp_path)
    store = ShardedResults(folder, shard_records=100, flush_s=0)
    store.append(row(0))
    assert folder.names("results") == ["part-00000.jsonl"]


def test_a_damaged_shard_line_is_named(tmp_path):
    folder = RunFolder(tmp_path)
    store = ShardedResults(folder, shard_records=2)
    store.append(row(0))
    store.append(row(1))
    part = tmp_path / "results" / "part-00000.jsonl"
    part.write_text(part.read_text() + "{not json\n")
    with pytest.raises(ResultsError, match=r"results/part-00000\.jsonl:3"):
        ShardedResults(folder)


def test_the_streamed_summary_equals_the_summary_of_the_list():
    rows = [row(i, reward=i / 10, tokens=i) for i in range(6)] + [row(6, reward=None, error="boom")]
    rows[1]["win_rate"], rows[2]["win_rate"] = 1.0, 0.0  # a workflow-specific field on some records
    rows[3]["stats"]["spec"] = {"drafted": 4, "accepted": 3, "tested": 4, "alpha_sum": 2.5}
    for pass_fail in (False, True):
        listed = summarize("score", rows, wall_s=1.0, new_tokens=5, pass_fail=pass_fail)
        streamed = summarize("score", iter(rows), wall_s=1.0, new_tokens=5, pass_fail=pass_fail)
        assert streamed == listed
    assert listed["num_prompts"] == 7 and listed["num_errors"] == 1
    assert listed["mean_reward"] == pytest.approx(sum(i / 10 for i in range(6)) / 7)  # pass/fail: the error is 0
    assert "win_rate" in listed["metrics"] and "acceptance_rate" in listed["metrics"]


def test_dataset_paths_are_checked_before_ray(tmp_path):
    write_jsonl(tmp_path / "data" / "a.jsonl", make_records(2))
    write_parquet(tmp_path / "data" / "b.parquet", make_records(2, start=2))
    (tmp_path / "data" / "_SUCCESS").write_text("")
    with pytest.raises(DatasetError, match="mixes formats"):
        list_files(str(tmp_path / "data"))
    assert list_files(str(tmp_path / "data" / "*.jsonl")) == ([str(tmp_path / "data" / "a.jsonl")], "jsonl")
    with pytest.raises(DatasetError, match="no such file"):
        list_files(str(tmp_path / "nothing"))


def test_dataset_files_needs_a_path_and_a_streamable_workflow(compose, tmp_path):
    from qsteer.run import run_job

    with pytest.raises(ConfigError, match=r"dataset\.path"):
        run_job(compose("dataset=files", "workflow=score"), tmp_path / "a")
    write_jsonl(tmp_path / "d.jsonl", make_records(2))
    with pytest.raises(ConfigError, match="workflow=train_value"):
        run_job(compose("dataset=files", f"dataset.path={tmp_path / 'd.jsonl'}", "workflow=train_value",
                        "value.path=x"), tmp_path / "b")


# --- runs on Ray ----------------------------------------------------------------------------------------


def expected_rewards(records: list[dict]) -> dict[str, float]:
    rewards = SentimentReward()(prompts=[r["prompt"] for r in records], completions=[r["completion"] for r in records])
    return {r["id"]: value for r, value in zip(records, rewards, strict=True)}


def strip(rows: list[dict]) -> list[tuple]:
    return sorted((r["id"], r["output"], r["reward"], r["error"]) for r in rows)


@pytest.mark.ray
def test_sharded_jsonl_and_parquet_runs_to_a_path_and_a_file_url_agree(ray_session, compose, tmp_path):
    from qsteer.run import run_job

    records = make_records(23)
    # three JSONL shards in a folder (one with a blank line), and the same records as two Parquet files
    write_jsonl(tmp_path / "jsonl" / "part-0.jsonl", records[:10], blank_after=4)
    write_jsonl(tmp_path / "jsonl" / "part-1.jsonl", records[10:20])
    write_jsonl(tmp_path / "jsonl" / "sub" / "part-2.jsonl", records[20:])
    write_parquet(tmp_path / "parquet" / "a.parquet", records[:12])
    write_parquet(tmp_path / "parquet" / "b.parquet", records[12:])
    common = ["workflow=score", "dataset=files", "batch_size=4", "shard_records=5"]
    local = run_job(compose(*common, f"dataset.path={tmp_path / 'jsonl'}"), tmp_path / "local")
    url = run_job(compose(*common, f"dataset.path={tmp_path / 'parquet'}/*.parquet",
                          f"output_dir=file://{tmp_path}/url"), tmp_path / "hydra")

    expected = expected_rewards(records)
    for out, summary in ((tmp_path / "local", local), (tmp_path / "url", url)):
        rows = shard_rows(out)
        assert sorted(r["id"] for r in rows) == sorted(expected)  # every record exactly once
        assert {r["id"]: r["reward"] for r in rows} == expected  # scored by the reward itself
        assert all(len(p.read_text().splitlines()) <= 5 for p in (out / "results").glob("part-*.jsonl"))
        assert summary["num_prompts"] == 23 and summary["num_errors"] == 0
        assert summary["mean_reward"] == pytest.approx(sum(expected.values()) / 23)
        assert json.loads((out / "summary.json").read_text()) == summary
        assert (out / "config.yaml").read_text().startswith("workflow:")
    assert strip(shard_rows(tmp_path / "local")) == strip(shard_rows(tmp_path / "url"))
    assert not (tmp_path / "hydra" / "results").exists()  # the URL output got the files


class StopAfter:
    """The sentiment reward, interrupted (as by Ctrl-C) on its `calls`+1-th call."""

    def __init__(self, calls: int) -> None:
        self.calls, self.reward = calls, SentimentReward()

    def __call__(self, prompts, completions, **columns):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.reward(prompts, completions)


@pytest.mark.ray
def test_an_interrupted_streamed_run_resumes_with_each_record_exactly_once(ray_session, compose, tmp_path):
    from qsteer.actors.local import local_reward
    from qsteer.run import run_job

    records = make_records(20)
    write_jsonl(tmp_path / "data" / "a.jsonl", records[:11])
    write_jsonl(tmp_path / "data" / "b.jsonl", records[11:])
    cfg = compose("workflow=score", "dataset=files", f"dataset.path={tmp_path / 'data'}", "batch_size=3",
                  "shard_records=4")
    out = tmp_path / "out"
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            run_job(cfg, out, roles={"reward": local_reward(StopAfter(calls=3))})
    finally:  # a stopped run ignores further signals while it cleans up; this test process must not
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    first = shard_rows(out)
    assert 0 < len(first) < 20  # what finished before the stop was written
    parts = {p.name: p.read_bytes() for p in (out / "results").glob("part-*.jsonl")}

    summary = run_job(cfg, out, roles={"reward": local_reward(SentimentReward())})
    rows = shard_rows(out)
    assert sorted(r["id"] for r in rows) == [r["id"] for r in records]  # exactly once
    assert {p.name: p.read_bytes() for p in (out / "results").glob("part-*.jsonl") if p.name in parts} == parts
    assert {r["id"]: r["reward"] for r in rows} == expected_rewards(records)
    assert summary["num_prompts"] == 20 and summary["metrics"]["scored_prompts"] == 20


@pytest.mark.ray
def test_a_bad_streamed_record_names_its_file_and_line_before_any_actor(ray_session, compose, tmp_path):
    from qsteer.run import run_job

    records = make_records(6)
    cases = []
    bad = [*records[:3], {"id": "r003", "completion": "no prompt"}, *records[4:]]
    cases.append((write_jsonl(tmp_path / "a" / "x.jsonl", bad, blank_after=2), r"x\.jsonl:5: .*neither 'prompt'"))
    no_completion = [*records[:4], {"id": "r004", "prompt": "p"}]
    cases.append((write_jsonl(tmp_path / "b" / "y.jsonl", no_completion), r"y\.jsonl:5: record 'r004': .*completion"))
    broken = tmp_path / "c" / "z.jsonl"
    write_jsonl(broken, records[:2])
    broken.write_text(broken.read_text() + '{"id": "r002", prompt}\n')
    cases.append((broken, r"z\.jsonl:3: invalid JSON"))
    cases.append((write_parquet(tmp_path / "d" / "w.parquet", [*records[:2], {"id": "r002", "completion": "c"}]),
                  r"w\.parquet: row 3: .*neither 'prompt'"))
    duplicate = write_jsonl(tmp_path / "e" / "v.jsonl", [*records[:3], records[1]])
    cases.append((duplicate, r"v\.jsonl:4: duplicate id 'r001'"))
    for path, message in cases:
        out = tmp_path / f"out-{path.parent.name}"
        with pytest.raises(DatasetError, match=message):
            run_job(compose("workflow=score", "dataset=files", f"dataset.path={path}"), out)
        assert not (out / "results").exists()
