"""qsteer-report --frontier: one point per run (reward, KL from the base, tokens), a table and a two-panel plot.

Hand-made run folders pin the arithmetic (exact numbers); real run folders from the tiny model
(run_job on in-process roles) check that what the workflows write lands on the frontier as each
method defines it: Best-of-N at its bound log N - (N-1)/N, tokenwise CD at its records' exact KL
(0 at alpha = 0).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml
from reward_fns import word_count

from qsteer.actors.local import LocalReplicas, local_policy, local_reward
from qsteer.actors.policy import Policy
from qsteer.actors.roles import PolicyGroup
from qsteer.metrics.frontier import FrontierError, best_of_n_kl_bound
from qsteer.report import frontier, main
from qsteer.run import run_job
from qsteer.values.model import ValueModel

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(folder, workflow: dict, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"workflow": workflow, "generation": {"max_new_tokens": 8}}))
    (folder / "results.jsonl").write_text("".join(json.dumps({"id": str(i), **r}) + "\n" for i, r in enumerate(rows)))


def rec(reward, tokens, **extra):
    stats = {"generated_tokens": tokens} | extra.pop("stats", {})
    return {"reward": reward, "stats": stats, "error": None if reward is not None else "boom", **extra}


@pytest.fixture
def folders(tmp_path):
    sweep = tmp_path / "runs" / "bon"  # a multirun folder: one run folder per N
    make_run(sweep / "0", {"name": "best_of_n", "n": 4, "aggregate": "max"}, [rec(1.0, 16), rec(0.5, 12)])
    make_run(sweep / "1", {"name": "best_of_n", "n": 1, "aggregate": "max"}, [rec(0.25, 4), rec(None, 3)])
    cd = tmp_path / "runs" / "cd"
    make_run(cd / "a0", {"name": "controlled_decoding", "mode": "tokenwise", "alpha": 0.0, "top_k": 5},
             [rec(0.0, 8, kl=0.0, kl_is_bound=False), rec(0.5, 6, kl=0.0, kl_is_bound=False)])
    make_run(cd / "a2", {"name": "controlled_decoding", "mode": "tokenwise", "alpha": 2.0, "top_k": 5},
             [rec(0.75, 8, kl=0.5, kl_is_bound=False), rec(0.25, 8, kl=1.5, kl_is_bound=False)])
    make_run(tmp_path / "runs" / "block", {"name": "controlled_decoding", "mode": "blockwise", "n": 2,
                                            "block_size": 4},
             [rec(0.5, 8, kl=0.6, kl_is_bound=True, stats={"sampled_tokens": 16}),
              rec(0.75, 4, kl=0.3, kl_is_bound=True, stats={"sampled_tokens": 8})])
    make_run(tmp_path / "runs" / "tq", {"name": "transfer_qstar", "alpha": 1.0, "top_k": 4, "rollouts": 2,
                                         "greedy": False},
             [rec(0.5, 8, kl=0.25, stats={"baseline_tokens": 64.0}), rec(0.5, 8, kl=0.75,
                                                                         stats={"baseline_tokens": 32.0})])
    make_run(tmp_path / "runs" / "beam", {"name": "beam_search", "n": 4, "beam_width": 2},
             [rec(0.9, 20), rec(0.7, 30)])
    return tmp_path / "runs"


def test_frontier_table_has_each_methods_reward_kl_and_tokens(folders):
    runs = folders
    table_path, plot_path = frontier([runs / "bon", runs / "cd" / "a2", runs / "cd" / "a0", runs / "block",
                                      runs / "tq", runs / "beam"])
    assert table_path == runs / "frontier.md" and plot_path == runs / "frontier.png"
    assert plot_path.read_bytes()[:8] == PNG
    rows = json.loads((runs / "frontier.json").read_text())
    got = [(r["method"], r["knob"], r["value"], r["mean_reward"], r["mean_kl"], r["kl_kind"], r["tokens_per_prompt"],
            r["num_errors"]) for r in rows]
    assert got == [
        # N=1's errored record has no reward: the mean is over the scored one; its tokens still count
        ("best_of_n", "n", 1, 0.25, 0.0, "bound", 3.5, 1),
        ("best_of_n", "n", 4, 0.75, pytest.approx(math.log(4) - 0.75), "bound", 14.0, 0),
        ("controlled_decoding/blockwise", "n", 2, 0.625, pytest.approx(0.45), "bound", 12.0, 0),  # sampled blocks
        ("controlled_decoding/tokenwise", "alpha", 0.0, 0.25, 0.0, "exact", 7.0, 0),
        ("controlled_decoding/tokenwise", "alpha", 2.0, 0.5, 1.0, "exact", 8.0, 0),
        ("transfer_qstar", "alpha", 1.0, 0.5, 0.5, "exact", 56.0, 0),  # 8 own + 48 rollout tokens
        ("beam_search", "beam_width", 2, 0.8, None, "no KL", 25.0, 0),
    ]
    table = (runs / "frontier.md").read_text().splitlines()
    assert table[0].startswith("| method | knob | value | mean_reward | mean_kl | kl_kind | tokens_per_prompt")
    assert table[3].startswith("| best_of_n | n | 4 | 0.75 | 0.6363 | bound | 14 | 2 | 0 |")
    assert table[-1].startswith("| beam_search | beam_width | 2 | 0.8 | - | no KL | 25 | 2 | 0 |")


def test_a_value_scored_search_is_a_line_of_its_own(folders):
    make_run(folders / "dvts_value", {"name": "dvts", "n": 4, "beam_width": 2, "scorer": "value"},
             [rec(0.5, 40), rec(0.25, 44)])
    frontier([folders / "beam", folders / "dvts_value"])
    rows = json.loads((folders / "frontier.json").read_text())
    assert [(r["method"], r["knob"], r["value"], r["mean_reward"], r["mean_kl"], r["kl_kind"], r["tokens_per_prompt"])
            for r in rows] == [("beam_search", "beam_width", 2, 0.8, None, "no KL", 25.0),
                               ("dvts/value", "n", 4, 0.375, None, "no KL", 42.0)]


def test_the_cli_takes_several_folders_and_an_out_folder(folders, tmp_path, monkeypatch):
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["qsteer-report", "--frontier", str(folders / "bon"), str(folders / "tq"),
                                      "--out", str(out)])
    main()
    assert [r["method"] for r in json.loads((out / "frontier.json").read_text())] == ["best_of_n"] * 2 + [
        "transfer_qstar"]
    assert (out / "frontier.png").read_bytes()[:8] == PNG
    monkeypatch.setattr(sys, "argv", ["qsteer-report", str(folders / "bon"), str(folders / "tq")])
    with pytest.raises(SystemExit):
        main()  # the sweep report takes one folder


def test_bad_folders_are_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder"):
        frontier([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: neither a run folder"):
        frontier([tmp_path / "empty"])
    (folders / "beam" / "config.yaml").unlink()
    with pytest.raises(FrontierError, match=r"beam: no config.yaml"):
        frontier([folders / "beam"])
    make_run(tmp_path / "train", {"name": "train_value"}, [rec(1.0, 4)])
    with pytest.raises(FrontierError, match=r"train: workflow=train_value has no place on the reward-vs-KL"):
        frontier([tmp_path / "train"])


@pytest.fixture(scope="module")
def head_folder(tiny_engine64, tmp_path_factory):
    """A Q-head on the tiny policy's backbone with random weights, saved as train_value saves one."""
    model = ValueModel.on_policy_model(tiny_engine64.model, "q")
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("head") / "value"
    model.save(folder, policy_path=tiny_engine64.path)
    return str(folder)


def test_real_runs_of_best_of_n_and_tokenwise_cd_land_on_the_frontier(compose, tiny_engine64, head_folder, tmp_path):
    base = ["dataset.limit=2", "generation.max_new_tokens=6", "model.dtype=float64"]
    for n in (1, 2):
        run_job(compose("workflow=best_of_n", f"workflow.n={n}", *base), tmp_path / "runs" / f"bon{n}",
                roles={"policy": local_policy(tiny_engine64), "reward": local_reward(word_count)})
    for alpha in (0, 4):
        policy = Policy(tiny_engine64)
        policy.load_value_heads([(head_folder, 1.0)])
        run_job(compose("workflow=controlled_decoding", f"workflow.alpha={alpha}", f"value.path={head_folder}",
                        *base), tmp_path / "runs" / f"cd{alpha}",
                roles={"policy": PolicyGroup(LocalReplicas([policy])), "reward": local_reward(word_count)})
    frontier([tmp_path / "runs"])
    rows = {(r["method"], r["value"]): r for r in json.loads((tmp_path / "runs" / "frontier.json").read_text())}
    assert set(rows) == {("best_of_n", 1), ("best_of_n", 2), ("controlled_decoding/tokenwise", 0),
                         ("controlled_decoding/tokenwise", 4)}
    for (method, value), row in rows.items():
        folder = tmp_path / "runs" / (f"bon{value}" if method == "best_of_n" else f"cd{value}")
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        summary = json.loads((folder / "summary.json").read_text())
        assert row["mean_reward"] == pytest.approx(summary["mean_reward"])
        # the win-rate summary's KL estimators read dict-valued `kl` only (a float one crashed summarize)
        assert "kl_k1" not in summary["metrics"]
        # every candidate's tokens, counted from the candidates themselves
        assert row["tokens_per_prompt"] == sum(c["num_tokens"] for r in records for c in r["candidates"]) / 2
        if method == "best_of_n":
            assert (row["mean_kl"], row["kl_kind"]) == (best_of_n_kl_bound(value), "bound")
        else:
            assert row["kl_kind"] == "exact"
            assert row["mean_kl"] == pytest.approx(sum(r["kl"] for r in records) / 2)
    assert rows[("best_of_n", 1)]["mean_kl"] == 0.0
    assert rows[("controlled_decoding/tokenwise", 0)]["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert rows[("controlled_decoding/tokenwise", 4)]["mean_kl"] > 0
