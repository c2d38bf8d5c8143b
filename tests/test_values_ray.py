"""The value roles through run_job on real Ray actors (tiny model): train_value, then controlled decoding
with the trained head riding in the policy actors and with a separate value in value actors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qsteer.run import run_job

pytestmark = [pytest.mark.ray]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_value_roles_on_ray(ray_session, compose, tiny_path, tmp_path):
    from qsteer.training.value import save_value_model
    from qsteer.values.model import ValueModel

    base = [f"model.path={tiny_path}", "dataset.limit=2", "generation.max_new_tokens=6", "batch_size=2",
            "model.num_threads=1"]
    train = run_job(compose("workflow=train_value", *base, "value.samples_per_prompt=3", "value.epochs=2",
                            "value.lr=1e-2"), tmp_path / "train")
    head = tmp_path / "train" / "value"
    assert json.loads((head / "value_card.json").read_text())["train_sequences"] == train["metrics"]["value"][
        "train_sequences"] > 0
    tokenwise = run_job(compose("workflow=controlled_decoding", *base, f"value.path={head}", "workflow.alpha=2"),
                        tmp_path / "tokenwise")
    assert tokenwise["num_errors"] == 0
    assert all(r["kl"] >= 0 and r["stats"]["policy_forwards"] > 0 for r in rows(tmp_path / "tokenwise"))

    # a separate scalar value (random head) in a value actor: blockwise asks it for block values,
    # tokenwise asks it from inside the policy actor, once per step
    model = ValueModel.separate(tiny_path, "scalar")
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    separate = tmp_path / "separate"
    save_value_model(separate, model, method="fudge", losses=[1.0], train_sequences=0, train_prefixes=0, heldout={})
    value = [f"value.path={separate}", "value.shape=scalar", "value.backbone=separate", "value.num_cpus=0"]
    blockwise = run_job(compose("workflow=controlled_decoding", "workflow.mode=blockwise", "workflow.n=3",
                                "workflow.block_size=4", *base, *value), tmp_path / "blockwise")
    assert blockwise["num_errors"] == 0
    assert all(len(b["values"]) == 3 for r in rows(tmp_path / "blockwise") for b in r["blocks"])
    remote = run_job(compose("workflow=controlled_decoding", "workflow.top_k=4", *base, *value),
                     tmp_path / "remote")
    assert remote["num_errors"] == 0
    assert all(r["stats"]["value_calls"] > 0 and r["kl"] >= 0 for r in rows(tmp_path / "remote"))
