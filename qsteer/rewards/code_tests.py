"""Code-tests reward: 1.0 when the completion passes the task's tests in the sandbox, else 0.0.

HumanEval-style records: `test` defines `check(candidate)`, `entry_point` names the function,
`prompt_code` (optional) is the signature and docstring that a body-only completion continues.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qsteer.rewards.sandbox import SandboxResult, run_python

# A fenced block; the closing fence may be missing when generation hit its token limit.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", ""}


class CodeTestsReward:
    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        max_processes: int = 32,
        max_workers: int = 2,
    ) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_processes = max_processes
        self.max_workers = max_workers

    def __call__(
        self,
        prompts: list[str],
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        **columns: Any,
    ) -> list[dict]:
        count = len(completions)
        tests = _column(columns, ("test", "tests"), count)
        entry_points = _column(columns, ("entry_point",), count)
        prompt_codes = _column(columns, ("prompt_code",), count, required=False)
        programs = [
            build_program(_completion_text(c), t, e, p)
            for c, t, e, p in zip(completions, tests, entry_points, prompt_codes, strict=True)
        ]
        # Threads suffice: each item waits on its own sandboxed child process.
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            results = list(pool.map(self._run, programs))
        return [
            {"reward": 1.0 if r.passed else 0.0, "info": {"reason": r.reason, "wall_s": round(r.wall_s, 3)}}
            for r in results
        ]

    def _run(self, program: str) -> SandboxResult:
        return run_python(
            program, timeout_s=self.timeout_s, memory_mb=self.memory_mb, max_processes=self.max_processes
        )


def extract_code(text: str) -> str:
    """The longest Python fenced block (the last one on a tie), else the raw text."""
    blocks = _python_blocks(text)
    return max(reversed(blocks), key=len) if blocks else text


def _python_blocks(text: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]


def build_program(completion: str, test: str, entry_point: str, prompt_code: str | None = None) -> str:
    """The program the sandbox runs: the solution, the task's tests, and the call to `check`."""
    code = extract_code(completion)
    if _defines(code, entry_point):
        # A full function often drops the prompt's imports (`from typing import List`).
        head = "\n".join(line for line in (prompt_code or "").splitlines() if _is_import(line))
        solution = f"{head}\n{code}" if head else code
    elif prompt_code:
        # A body continuation: HumanEval's convention is the prompt followed by the completion.
        # A raw continuation may go on the prompt's last line; a fenced block starts a new one.
        fenced = bool(_python_blocks(completion))
        joiner = "\n" if fenced and not prompt_code.endswith("\n") else ""
        solution = prompt_code + joiner + code
    else:
        solution = code  # the missing function then fails with a NameError, which says why
    return f"{solution}\n\n{test}\n\ncheck({entry_point})\n"


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _is_import(line: str) -> bool:
    return line.startswith(("import ", "from "))


def _completion_text(completion: Any) -> str:
    # TRL passes conversational completions as a list of messages.
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def _column(columns: dict, names: tuple[str, ...], count: int, required: bool = True) -> list:
    for name in names:
        if name in columns and columns[name] is not None:
            values = list(columns[name])
            if len(values) != count:
                raise ValueError(f"column {name!r} has {len(values)} values for {count} completions")
            return values
    if required:
        raise ValueError(
            f"code_tests reward needs the dataset column {names[0]!r} (got columns: {sorted(columns)})"
        )
    return [None] * count
