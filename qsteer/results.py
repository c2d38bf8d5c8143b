"""The run folder's files: `results.jsonl` (append-only, resumable) and `summary.json`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from qsteer.config import resource_keys
from qsteer.metrics import mean_pass_at_k
from qsteer.metrics.inference_win_rate import summary_metrics as win_rate_metrics
from qsteer.metrics.speculative import run_metrics


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: a crash leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp makes the file private (0600); run files get the mode any other file would (umask)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps(obj: Any, **kwargs: Any) -> str:
    """JSON with every NaN or infinity as null: bare `NaN` is not JSON, and most readers refuse it.
    (A reward that is not finite never gets here: it is its record's error.)"""
    return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class ResultsError(ValueError):
    """A run folder's results.jsonl cannot be resumed from; the message names the file and line."""


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would open a window for other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


class ResultsFile:
    """One JSON object per line, fsynced as written, every id exactly once.

    On open, a last line cut short by a crash is dropped (its prompt reruns). Records that ended
    in an error are dropped by `drop_errors` so that a resumed run retries them. Any other damaged
    line is a ResultsError naming its line: skipping it would silently redo or lose a record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done_ids: set[str] = set()
        self.errored_ids: set[str] = set()
        self.new_tokens = 0
        if path.exists():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for row in self.read():
                self.done_ids.add(row["id"])
                if row.get("error") is not None:
                    self.errored_ids.add(row["id"])

    def drop_errors(self) -> int:
        """Remove the records that ended in an error, so this run redoes them; how many there were."""
        if not self.errored_ids:
            return 0
        kept = [line for line, row in self._lines() if row["id"] not in self.errored_ids]
        write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.done_ids -= self.errored_ids
        dropped, self.errored_ids = len(self.errored_ids), set()
        return dropped

    def append(self, row: dict[str, Any]) -> None:
        if row["id"] in self.done_ids:
            return
        with open(self.path, "a") as f:
            f.write(dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done_ids.add(row["id"])
        self.new_tokens += int(row.get("stats", {}).get("generated_tokens", 0))

    def read(self) -> list[dict[str, Any]]:
        return [row for _, row in self._lines()]

    def _lines(self) -> list[tuple[str, dict[str, Any]]]:
        return _parse_lines(self.path, self.path.read_bytes()) if self.path.exists() else []


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results.jsonl as it stands, changing nothing: a last line still being written
    is left out. For readers beside a running run (reports); the run itself opens a ResultsFile."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [row for _, row in _parse_lines(path, data[: data.rfind(b"\n") + 1])]


def _parse_lines(path: Path, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    raws = data.split(b"\n")
    if raws and not raws[-1]:
        raws.pop()  # the file ends with a newline: nothing follows it
    for number, raw in enumerate(raws, start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ResultsError(f"{where}: not UTF-8 ({err.reason} at byte {err.start}); {_DAMAGED}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ResultsError(f"{where}: not a JSON record ({err.msg}); {_DAMAGED}") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ResultsError(f"{where}: not a result record (no 'id'); {_DAMAGED}")
        out.append((line, {**row, "id": str(row["id"])}))
    return out


_DAMAGED = "the file was changed outside qsteer: repair or delete that line (its prompt then reruns)"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {'workflow.n': 4, ...}."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a run folder's config and this run's, resources aside.

    Resources change where or how fast a run goes, never what it writes; they are the config
    fields marked `resource` in qsteer.config (replicas, CPUs, GPUs, batch sizes, the cluster,
    where a draft model runs, dataset.limit), so a resumed run may change them.
    """
    resources = resource_keys(new)
    before, after = flatten(old), flatten(new)
    changed = []
    for key in sorted(set(before) | set(after)):
        if any(key == r or key.startswith(r + ".") for r in resources):
            continue
        if before.get(key) != after.get(key):
            changed.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changed


FIRST_ERRORS = 5  # record errors quoted in the summary; results.jsonl has them all


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(workflow: str, rows: list[dict[str, Any]], *, wall_s: float, new_tokens: int,
              startup_s: float | None = None, generation_s: float | None = None, pass_fail: bool = False,
              unfinished: list[str] | None = None, policy_replica_calls: list[int] | None = None) -> dict[str, Any]:
    """The run's summary over all its records.

    With a pass/fail reward (`pass_fail`), a record or candidate that errored (no reward: a
    scorer crash, a prompt over the context) is a failure: it counts 0 in the means and in
    pass@k, so an error can never raise the pass rate. Other rewards have no failing value, so
    their means cover the records that were scored (`scored_prompts` says how many).

    `tokens_per_s` is this run's new tokens over the time its batches ran (`generation_s`), so
    starting Ray and loading models (`startup_s`, reported apart) does not dilute it.
    """
    failure = 0.0 if pass_fail else None
    rewards = [r["reward"] if r.get("reward") is not None else failure for r in rows]
    rewards = [v for v in rewards if v is not None]
    candidate_rewards = [c["reward"] if c.get("reward") is not None else failure
                         for r in rows for c in r.get("candidates", [])]
    candidate_rewards = [v for v in candidate_rewards if v is not None]
    metrics: dict[str, Any] = {
        "mean_candidate_reward": _mean(candidate_rewards),
        "max_reward": max(rewards) if rewards else None,
        "min_reward": min(rewards) if rewards else None,
        "scored_prompts": len(rewards),
        "new_generated_tokens": new_tokens,
        "prompt_tokens": sum(int(r.get("stats", {}).get("prompt_tokens", 0)) for r in rows),
    }
    if pass_fail and rows:
        # A record with no candidates (it erred before generating) failed all of its samples.
        samples = max((len(r.get("candidates", [])) for r in rows), default=0) or 1
        counts = [(len(r["candidates"]) or samples, sum(c.get("reward") == 1.0 for c in r["candidates"]))
                  for r in rows]
        for k in sorted({1, min(n for n, _ in counts)}):
            metrics[f"pass@{k}"] = mean_pass_at_k(counts, k)
    metrics.update(run_metrics(rows))
    metrics.update(code_metrics(rows))
    metrics.update(win_rate_metrics(rows))
    errors = [f"{r['id']}: {r['error']}" for r in rows if r.get("error") is not None]
    if errors:
        metrics["first_errors"] = errors[:FIRST_ERRORS]
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
        "startup_s": None if startup_s is None else round(startup_s, 3),
        "generation_s": None if generation_s is None else round(generation_s, 3),
        "tokens_per_s": round(new_tokens / generation_s, 2) if generation_s else None,
        "metrics": metrics,
    }


def code_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """pass@k for k = 1..n, plain and public-filtered, for records of the code workflows.

    n is the fewest candidates of any record (the estimator needs n >= k); a record's
    candidates carry `passed` (hidden tests) and `passed_public` (the statement's examples).
    """
    from qsteer.metrics.code_pass import code_counts, pass_at_k_curve, public_filtered_pass_at_k_curve

    judged = [r["candidates"] for r in rows if r.get("candidates") and "passed_public" in r["candidates"][0]]
    if not judged:
        return {}
    counts = [code_counts([c["passed"] for c in cands], [c["passed_public"] for c in cands]) for cands in judged]
    return {
        "pass_at_k": [round(v, 4) for v in pass_at_k_curve(counts)],
        "pass_at_k_public_filtered": [round(v, 4) for v in public_filtered_pass_at_k_curve(counts)],
        "selected_pass_rate": round(sum(bool(r.get("reward")) for r in rows if r.get("candidates")) / len(judged), 4),
        "sandbox_faults": sum(int(r.get("stats", {}).get("sandbox_faults", 0)) for r in rows),
    }
