"""The run folder's files: `results.jsonl` (append-only, resumable) and `summary.json`."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from qsteer.config import ConfigError, resource_keys
from qsteer.metrics import pass_at_k
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

    def close(self) -> None:
        """Nothing to write: every record was fsynced as it was appended."""

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


class RunFolder:
    """A run's folder: a local path, or any fsspec URL (`file://`, `memory://`, `s3://`, `gs://`, ...).

    Files are written whole and atomically: on a local filesystem through a temp file and a rename
    (`write_atomic`), on an object store by one put, which publishes the whole object or nothing.
    """

    def __init__(self, where: str | Path) -> None:
        import fsspec

        self.url = str(where)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as err:  # an unknown protocol, or its package missing (s3fs, gcsfs)
            raise ConfigError(f"output_dir={self.url}: fsspec cannot open it: {err}") from None
        self.root = root.rstrip("/") or "/"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local: Path | None = Path(self.root) if "file" in protocols else None
        """The folder as a local path when it is on this machine's filesystem (flock, appends), else None."""

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def make(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when there is none."""
        try:
            return self.fs.cat_file(self.path(name)).decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        if self.local is not None:
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.local / name, text)
            return
        parent = self.path(name).rpartition("/")[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(self.path(name), text.encode("utf-8"))

    def names(self, folder: str) -> list[str]:
        """The file names in a sub-folder, sorted; [] when it does not exist."""
        try:
            found = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(p).rstrip("/").rpartition("/")[2] for p in found)


class ShardedResults:
    """A run's records as shards, `results/part-00000.jsonl`, ..., for datasets of any size and for
    output folders on object stores.

    Why a second layout beside `results.jsonl`: an object store cannot append, and resuming from
    one file means reading all of it. Here each shard is written once, whole (`shard_records`
    finished records, or fewer once the oldest has waited `flush_s`, or what is left when the run
    ends or stops), and never rewritten. Resuming reads the shards line by line and keeps only the
    ids, so the driver's memory stays flat at any size. A record that ended in an error is not
    done: a rerun redoes it and writes its new row to a later shard; `read` gives each id's last
    row, so every id counts once. What a hard crash (SIGKILL, a lost node) loses is the unwritten
    shard, at most `flush_s` of finished work, which a rerun redoes; Ctrl-C and SIGTERM write it.
    The small shipped datasets keep `results.jsonl`, whose per-record fsync loses nothing and which
    every tool reads; one layout for both would have made the small runs' files worse for nothing.
    """

    FOLDER = "results"

    def __init__(self, folder: RunFolder, shard_records: int = 10_000, flush_s: float = 60.0) -> None:
        self.folder = folder
        self.shard_records = shard_records
        self.flush_s = flush_s
        self.done_ids: set[str] = set()
        self.new_tokens = 0
        self._errored: set[str] = set()
        self._buffer: list[str] = []
        self._oldest: float | None = None
        parts = self._parts()
        self._next = (int(parts[-1][len("part-"):-len(".jsonl")]) + 1) if parts else 0
        for _, row in self._rows(parts):
            self.done_ids.add(row["id"])
            if row.get("error") is not None:
                self._errored.add(row["id"])
            else:
                self._errored.discard(row["id"])  # its retry succeeded

    @property
    def errored_ids(self) -> set[str]:
        return set(self._errored)

    def drop_errors(self) -> int:
        """Let this run redo the records whose last row is an error (their rows stay in their shards; a
        redo's row comes later and `read` prefers it); how many there were."""
        self.done_ids -= self._errored
        dropped, self._errored = len(self._errored), set()
        return dropped

    def append(self, row: dict[str, Any]) -> None:
        if row["id"] in self.done_ids:
            return
        self._buffer.append(dumps(row) + "\n")
        self._oldest = self._oldest if self._oldest is not None else time.monotonic()
        self.done_ids.add(row["id"])
        self.new_tokens += int(row.get("stats", {}).get("generated_tokens", 0))
        if len(self._buffer) >= self.shard_records or time.monotonic() - self._oldest >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as the next shard."""
        if not self._buffer:
            return
        self.folder.write_text(f"{self.FOLDER}/part-{self._next:05d}.jsonl", "".join(self._buffer))
        self._next += 1
        self._buffer, self._oldest = [], None

    close = flush

    def read(self) -> Iterator[dict[str, Any]]:
        """Every record once, the last row of each id, shard by shard: two passes over the shards, holding
        only the ids whose last row so far is an error (with where that row is)."""
        self.flush()
        parts = self._parts()
        last_error: dict[str, tuple[str, int]] = {}
        for where, row in self._rows(parts):
            if row.get("error") is not None:
                last_error[row["id"]] = where
            else:
                last_error.pop(row["id"], None)
        for where, row in self._rows(parts):
            if row.get("error") is None or last_error.get(row["id"]) == where:
                yield row

    def _parts(self) -> list[str]:
        """The shards' names in the order they were written (by number: names sort wrongly past 99999)."""
        names = [n for n in self.folder.names(self.FOLDER) if n.startswith("part-") and n.endswith(".jsonl")
                 and n[len("part-"):-len(".jsonl")].isdigit()]
        return sorted(names, key=lambda n: int(n[len("part-"):-len(".jsonl")]))

    def _rows(self, parts: list[str]) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
        for name in parts:
            path = self.folder.path(f"{self.FOLDER}/{name}")
            with self.folder.fs.open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    where = f"{self.folder.url.rstrip('/')}/{self.FOLDER}/{name}:{number}"
                    try:
                        row = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as err:
                        raise ResultsError(f"{where}: not a JSON record ({err}); {_DAMAGED}") from None
                    if not isinstance(row, dict) or "id" not in row:
                        raise ResultsError(f"{where}: not a result record (no 'id'); {_DAMAGED}")
                    yield (name, number), {**row, "id": str(row["id"])}


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


def summarize(workflow: str, rows: Iterable[dict[str, Any]], *, wall_s: float, new_tokens: int,
              startup_s: float | None = None, generation_s: float | None = None, pass_fail: bool = False,
              unfinished: list[str] | None = None, policy_replica_calls: list[int] | None = None,
              vendi: bool = False) -> dict[str, Any]:
    """The run's summary over all its records, in one pass with running sums.

    `rows` is a list, or an iterator over a sharded run's records (`ShardedResults.read`), which is
    never held whole: the contract's keys are running sums, pass@k counts (n, c) pairs, and the
    workflow-specific metrics (speculative acceptance, code pass@k, win rate and KL) see only the
    records that carry their fields, cut down to those fields (none, for a scoring run).

    With a pass/fail reward (`pass_fail`), a record or candidate that errored (no reward: a
    scorer crash, a prompt over the context) is a failure: it counts 0 in the means and in
    pass@k, so an error can never raise the pass rate. Other rewards have no failing value, so
    their means cover the records that were scored (`scored_prompts` says how many).

    With `vendi` (the code workflows' `workflow.vendi`), the code records' summary adds the mean
    per-problem Vendi score of their candidates (`code_metrics`).

    `tokens_per_s` is this run's new tokens over the time its batches ran (`generation_s`), so
    starting Ray and loading models (`startup_s`, reported apart) does not dilute it.
    """
    failure = 0.0 if pass_fail else None
    prompts = errors_count = generated = prompt_tokens = 0
    rewards = _Running()
    candidate_rewards = _Running()
    pass_counts: Counter[tuple[int, int]] = Counter()  # (candidates, passed) -> records; 0 candidates: erred early
    errors: list[str] = []
    specific: list[dict[str, Any]] = []  # the records the workflow-specific metrics read, cut to their fields
    for r in rows:
        prompts += 1
        rewards.add(r["reward"] if r.get("reward") is not None else failure)
        for c in r.get("candidates", []):
            candidate_rewards.add(c["reward"] if c.get("reward") is not None else failure)
        stats = r.get("stats", {})
        prompt_tokens += int(stats.get("prompt_tokens", 0))
        generated += int(stats.get("generated_tokens", 0))
        if r.get("error") is not None:
            errors_count += 1
            if len(errors) < FIRST_ERRORS:
                errors.append(f"{r['id']}: {r['error']}")
        if pass_fail:
            pass_counts[(len(r.get("candidates", [])), sum(c.get("reward") == 1.0 for c in r.get("candidates", [])))] += 1
        if not isinstance(rows, list) and (fields := _specific_fields(r)):
            specific.append(fields)
    metrics: dict[str, Any] = {
        "mean_candidate_reward": candidate_rewards.mean(),
        "max_reward": rewards.max,
        "min_reward": rewards.min,
        "scored_prompts": rewards.count,
        "new_generated_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
    }
    if pass_fail and prompts:
        # A record with no candidates (it erred before generating) failed all of its samples.
        samples = max(n for n, _ in pass_counts) or 1
        counts = Counter()
        for (n, c), records in pass_counts.items():
            counts[(n or samples, c)] += records
        for k in sorted({1, min(n for n, _ in counts)}):
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) * m for (n, c), m in counts.items()) / prompts
    if isinstance(rows, list):
        specific = rows
    metrics.update(run_metrics(specific))
    metrics.update(code_metrics(specific, vendi=vendi))
    metrics.update(win_rate_metrics(specific))
    if errors:
        metrics["first_errors"] = errors
    if unfinished:
        metrics["unfinished"] = unfinished
    if policy_replica_calls:
        metrics["policy_replica_calls"] = policy_replica_calls
    return {
        "workflow": workflow,
        "num_prompts": prompts,
        "num_errors": errors_count,
        "mean_reward": rewards.mean(),
        "generated_tokens": generated,
        "wall_s": round(wall_s, 3),
        "startup_s": None if startup_s is None else round(startup_s, 3),
        "generation_s": None if generation_s is None else round(generation_s, 3),
        "tokens_per_s": round(new_tokens / generation_s, 2) if generation_s else None,
        "metrics": metrics,
    }


class _Running:
    """Count, sum, max and min of the values added, None skipped."""

    def __init__(self) -> None:
        self.count, self.total = 0, 0.0
        self.max: float | None = None
        self.min: float | None = None

    def add(self, value: float | None) -> None:
        if value is None:
            return
        self.count += 1
        self.total += value
        self.max = value if self.max is None else max(self.max, value)
        self.min = value if self.min is None else min(self.min, value)

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


_SPECIFIC_STATS = ("spec", "spec_wall_s", "plain_wall_s", "plain_generated_tokens")
_SPECIFIC_KEYS = ("identical_to_plain", "win_rate", "win_rates", "calibrated", "reference_calibrated", "kl",
                  "idea_similarity")


def _specific_fields(row: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of `row` that run_metrics, code_metrics and win_rate_metrics read, or None when it has
    none of the fields that make it count there (a scoring or Best-of-N record)."""
    stats = row.get("stats") or {}
    candidates = row.get("candidates") or []
    judged = bool(candidates) and "passed_public" in candidates[0]
    if not (judged or any(k in stats for k in _SPECIFIC_STATS) or any(k in row for k in _SPECIFIC_KEYS)):
        return None
    out: dict[str, Any] = {k: row[k] for k in _SPECIFIC_KEYS if k in row}
    out["stats"] = {k: stats[k] for k in (*_SPECIFIC_STATS, "generated_tokens", "sandbox_faults") if k in stats}
    if judged:
        out["reward"] = row.get("reward")
        # the text too: metrics.vendi embeds the programs
        out["candidates"] = [{"passed": c.get("passed"), "passed_public": c.get("passed_public"), "text": c.get("text")}
                             for c in candidates]
    return out


def code_metrics(rows: list[dict[str, Any]], vendi: bool = False) -> dict[str, Any]:
    """pass@k for k = 1..n, plain and public-filtered, and diversity, for records of the code workflows.

    n is the fewest candidates of any record (the estimator needs n >= k); a record's
    candidates carry `passed` (hidden tests) and `passed_public` (the statement's examples).
    Diversity: `idea_diversity` (1 - the mean of the records' judged `idea_similarity`, when the
    workflow judged ideas) and, with `vendi`, the mean Vendi score of each record's candidate
    programs (their code blocks; records with one candidate are left out).
    """
    from qsteer.metrics.code_pass import code_counts, pass_at_k_curve, public_filtered_pass_at_k_curve
    from qsteer.metrics.idea_diversity import idea_diversity
    from qsteer.rewards.code_tests import extract_code

    judged = [r["candidates"] for r in rows if r.get("candidates") and "passed_public" in r["candidates"][0]]
    if not judged:
        return {}
    counts = [code_counts([c["passed"] for c in cands], [c["passed_public"] for c in cands]) for cands in judged]
    out: dict[str, Any] = {
        "pass_at_k": [round(v, 4) for v in pass_at_k_curve(counts)],
        "pass_at_k_public_filtered": [round(v, 4) for v in public_filtered_pass_at_k_curve(counts)],
        "selected_pass_rate": round(sum(bool(r.get("reward")) for r in rows if r.get("candidates")) / len(judged), 4),
        "sandbox_faults": sum(int(r.get("stats", {}).get("sandbox_faults", 0)) for r in rows),
    }
    if vendi:
        from qsteer.metrics.vendi import mean_vendi_score

        score = mean_vendi_score([[extract_code(c.get("text") or "") for c in cands] for cands in judged])
        out["vendi"] = None if score is None else round(score, 4)
    similarities = [r["idea_similarity"] for r in rows if r.get("idea_similarity")]
    if similarities:
        diversity = idea_diversity([s["similarity"] for s in similarities])
        out["idea_diversity"] = None if diversity is None else round(diversity, 4)
        out["idea_judge"] = {key: sum(s[key] for s in similarities) for key in ("pairs", "same", "unclear")}
    return out
