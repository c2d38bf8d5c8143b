"""The run folder's files: `results.jsonl` (append-only, resumable) and `summary.json`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from qsteer.metrics import mean_pass_at_k
from qsteer.metrics.speculative import run_metrics


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: a crash leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultsFile:
    """One JSON object per line, fsynced as written. On open, a line cut short by a crash is
    dropped (its prompt reruns), so every id ends up exactly once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done_ids: set[str] = set()
        self.new_tokens = 0
        if path.exists():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for line in complete.decode().splitlines():
                if line.strip():
                    self.done_ids.add(str(json.loads(line)["id"]))

    def append(self, row: dict[str, Any]) -> None:
        if row["id"] in self.done_ids:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done_ids.add(row["id"])
        self.new_tokens += int(row.get("stats", {}).get("generated_tokens", 0))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


# Keys that change where or how fast a run goes, never what it writes: a resumed run may change them.
_RESOURCE_KEYS = ("progress", "batch_size", "cluster", "dataset.limit", "model.replicas", "model.num_cpus",
                  "model.num_gpus", "model.num_threads", "model.max_batch_rows", "model.max_restarts",
                  "reward.replicas", "reward.num_cpus", "reward.num_gpus", "reward.max_restarts")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {'workflow.n': 4, ...}."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a run folder's config and this run's, resources aside."""
    before, after = flatten(old), flatten(new)
    changed = []
    for key in sorted(set(before) | set(after)):
        if any(key == r or key.startswith(r + ".") for r in _RESOURCE_KEYS):
            continue
        if before.get(key) != after.get(key):
            changed.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changed


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(workflow: str, rows: list[dict[str, Any]], *, wall_s: float, new_tokens: int,
              unfinished: list[str] | None = None, policy_replica_calls: list[int] | None = None) -> dict[str, Any]:
    rewards = [r["reward"] for r in rows if r.get("reward") is not None and math.isfinite(r["reward"])]
    candidate_rewards = [c["reward"] for r in rows for c in r.get("candidates", []) if c.get("reward") is not None]
    metrics: dict[str, Any] = {
        "mean_candidate_reward": _mean(candidate_rewards),
        "max_reward": max(rewards) if rewards else None,
        "min_reward": min(rewards) if rewards else None,
        "new_generated_tokens": new_tokens,
        "prompt_tokens": sum(int(r.get("stats", {}).get("prompt_tokens", 0)) for r in rows),
    }
    # Pass/fail rewards (code tests): report pass@k over each prompt's candidates.
    counts = [(len(r["candidates"]), sum(c["reward"] == 1.0 for c in r["candidates"]))
              for r in rows if r.get("candidates") and r.get("error") is None]
    if candidate_rewards and all(v in (0.0, 1.0) for v in candidate_rewards) and counts:
        n = min(n for n, _ in counts)
        for k in sorted({1, n}):
            metrics[f"pass@{k}"] = mean_pass_at_k(counts, k)
    metrics.update(run_metrics(rows))
    if unfinished:
        metrics["unfinished"] = unfinished
    if policy_replica_calls:
        metrics["policy_replica_calls"] = policy_replica_calls
    generated = sum(int(r.get("stats", {}).get("generated_tokens", 0)) for r in rows)
    return {
        "workflow": workflow,
        "num_prompts": len(rows),
        "num_errors": sum(r.get("error") is not None for r in rows),
        "mean_reward": _mean(rewards),
        "generated_tokens": generated,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(new_tokens / wall_s, 2) if wall_s > 0 else None,
        "metrics": metrics,
    }
