"""`dataset=files`: sharded JSONL or Parquet records streamed through Ray Data.

The driver never holds the dataset. Ray Data's read tasks parse the files on the cluster's
workers (`ray.data.read_json` / `read_parquet`) and `iter_batches` hands the driver a few
blocks at a time, in file order (files sorted, rows with `preserve_order`, so `dataset.limit` and resume mean the same
records every time); the driver validates each record as the other datasets are validated
(`qsteer.data.validate_record`, plus the job's own needs: a `completion` to score, a reward's
columns) and passes it on. What the driver keeps is the set of ids, for duplicates and resume.

Errors name the file and the line (JSONL) or row (Parquet). Each file is its own Ray Data
dataset, read in turn, so the driver knows the file of every row; Ray Data does not number
lines, so the driver counts a file's rows as they arrive and, only when one is bad, finds its
line by reading that file up to it (blank lines are skipped by both). When Arrow cannot read a JSONL
file at all (invalid JSON, a field that changes type between lines), the files are read again
with qsteer's own line reader (`qsteer.data.read_jsonl`), which names the line.

Ray Data runs on Ray, so this module sits in the orchestrator, above the actors: `qsteer.data`,
which the layers below import, stays free of Ray.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from typing import Any

from qsteer.data import DatasetError, validate_record

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
BATCH_ROWS = 1024  # rows per block handed to the driver: a few hundred KB of prompts
# Read tasks take no CPU of their own: on a small local Ray the role actors may hold every CPU, and
# a read task that waits for one would stall the run. One file is one read task, read in turn.
READ_CPUS = 0

Check = Callable[[dict[str, Any]], "str | None"]  # a record -> what it lacks for this job, or None


def list_files(path: str, fmt: str = "auto") -> tuple[list[str], str]:
    """The files `path` names (a file, a folder searched recursively, or a glob), sorted, and their
    format; DatasetError when there are none or their formats mix."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as err:  # an unknown protocol, or its package missing (s3fs, gcsfs)
        raise DatasetError(f"dataset.path={path}: fsspec cannot open it: {err}") from None
    if glob.has_magic(root):
        found = fs.glob(root)
    elif fs.isdir(root):
        # hidden and marker files (`.part`, `_SUCCESS`) are not data, as Spark and Ray Data leave them
        found = [p for p in fs.find(root)
                 if not any(part.startswith((".", "_")) for part in p[len(root):].strip("/").split("/"))]
    elif fs.isfile(root):
        found = [root]
    else:
        raise DatasetError(f"dataset.path={path}: no such file or folder, and no glob")
    found = sorted(p for p in found if _suffix(p) in FORMATS or p == root)
    if not found:
        raise DatasetError(f"dataset.path={path}: holds no .jsonl, .json or .parquet file")
    formats = {fmt} if fmt != "auto" else {FORMATS.get(_suffix(p), "unknown") for p in found}
    if formats == {"unknown"}:
        raise DatasetError(f"dataset.path={path}: the file's extension does not say its format; set "
                           "dataset.format=jsonl or dataset.format=parquet")
    if len(formats) != 1:
        raise DatasetError(f"dataset.path={path}: mixes formats ({', '.join(sorted(formats))}); point it at "
                           "one format, or set dataset.format")
    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    return [p if local else fs.unstrip_protocol(p) for p in found], formats.pop()


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


class FileRecords:
    """The validated records of `dataset=files`, read through Ray Data; iterate it for every record in
    file order (the first `limit` of them), or call `records(skip)` to leave out finished ids."""

    def __init__(self, path: str, fmt: str = "auto", limit: int | None = None, check: Check | None = None) -> None:
        self.path = path
        self.files, self.format = list_files(path, fmt)
        self.limit = limit
        self.check = check

    def dataset(self, path: str) -> Any:
        """The Ray Data dataset of one file's rows (Ray must be connected).

        One dataset per file, read in turn, rather than one over all files with `include_paths`:
        that option writes the file name into a `path` column, overwriting a record's own `path`.
        """
        import logging

        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not two INFO lines per file and pass
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # file order: `limit` and resume see the same records
        context.enable_progress_bars = False  # the run has its own bar
        read = ray.data.read_parquet if self.format == "parquet" else ray.data.read_json
        return read(path, partitioning=None, file_extensions=None, num_cpus=READ_CPUS)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record, _, _ in self._located():
            yield record

    def records(self, skip: set[str] | frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
        """The records whose ids are not in `skip` (a resumed run's finished ones)."""
        return (record for record in self if record["id"] not in skip)

    def scan(self, done: set[str] | frozenset[str] = frozenset()) -> tuple[int, int]:
        """Read every record once, as a run would, and raise DatasetError at the first bad one or the first
        repeated id; (records, records not in `done`). Holds only their ids."""
        seen: set[str] = set()
        remaining = 0
        for record, path, index in self._located():
            if record["id"] in seen:
                raise DatasetError(f"{self._where(path, index)}: duplicate id {record['id']!r} (an earlier "
                                   f"record has it; ids must be unique over all files of dataset.path={self.path})")
            seen.add(record["id"])
            remaining += record["id"] not in done
        return len(seen), remaining

    def _located(self) -> Iterator[tuple[dict[str, Any], str, int]]:
        taken = 0
        for path in self.files:
            if self.limit is not None and taken >= self.limit:
                return
            index = 0
            try:
                for batch in self.dataset(path).iter_batches(batch_size=BATCH_ROWS, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        if self.limit is not None and taken >= self.limit:
                            return
                        yield self._record(row, path, index), path, index
                        index += 1
                        taken += 1
            except DatasetError:
                raise
            except Exception as err:  # Ray Data's wrapping of Arrow's error: find the line ourselves
                raise self._diagnose(path, err) from None

    def _record(self, row: dict[str, Any], path: str, index: int) -> dict[str, Any]:
        # Arrow reads a file into one schema: a key a record lacks comes back as null
        record = {key: value for key, value in row.items() if value is not None}
        try:
            record = validate_record(record, path)
        except DatasetError as err:
            raise DatasetError(str(err).replace(path, self._where(path, index), 1)) from None
        problem = self.check(record) if self.check is not None else None
        if problem:
            raise DatasetError(f"{self._where(path, index)}: record {record['id']!r}: {problem}")
        return record

    def _where(self, path: str, index: int) -> str:
        """`file:line` of a JSONL file's index-th record (0-based, blank lines skipped), `file: row N` of Parquet."""
        if self.format == "parquet":
            return f"{path}: row {index + 1}"
        return f"{path}:{_line_of(path, index)}"

    def _diagnose(self, path: str, err: Exception) -> DatasetError:
        if self.format == "jsonl" and "://" not in path:  # qsteer's line reader reads local files
            from qsteer.data import read_jsonl

            try:
                for _ in read_jsonl(path):
                    pass
            except DatasetError as found:
                return found
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line or "Invalid" in line),
                      lines[-1] if lines else type(err).__name__)
        hint = ("; in JSONL each field must keep one JSON type on every line (Arrow infers one schema per file)"
                if self.format == "jsonl" else "")
        return DatasetError(f"{path}: Ray Data could not read this file: {reason}{hint}")


def _line_of(path: str, index: int) -> int:
    """The 1-based line of the index-th non-blank line of a JSONL file."""
    import fsspec

    seen = -1
    with fsspec.open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                seen += 1
                if seen == index:
                    return number
    return index + 1
