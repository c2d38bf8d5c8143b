"""Code-tests reward: 1.0 when the completion passes the task's tests in the sandbox, else 0.0.

HumanEval-style records: `test` defines `check(candidate)`, `entry_point` names the function,
and the signature and docstring that a body-only completion continues come from `prompt_code`
or, as in HumanEval's own files, from the prompt itself when it is code defining `entry_point`.
The solution and the test run in separate interpreters (see `sandbox.run_tests`), so a
completion can neither rewrite the test nor forge its verdict.
"""

from __future__ import annotations

import ast
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qsteer.rewards.sandbox import SandboxResult, run_tests

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
        tests = [_test_text(t) for t in _column(columns, ("test", "tests"), count)]
        entry_points = _column(columns, ("entry_point",), count)
        prompt_codes = _column(columns, ("prompt_code",), count, required=False)
        prompt_codes = [
            code if code is not None else code_prompt(prompt, entry_point)
            for code, prompt, entry_point in zip(prompt_codes, list(prompts), entry_points, strict=True)
        ]
        jobs = [
            (build_solution(_completion_text(c), e, p), t, e)
            for c, t, e, p in zip(completions, tests, entry_points, prompt_codes, strict=True)
        ]
        # Threads suffice: each item waits on its own sandbox.
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            results = list(pool.map(self._run, jobs))
        return [_scored(r) for r in results]

    def _run(self, job: tuple[str, str, str]) -> SandboxResult:
        solution, test, entry_point = job
        return run_tests(
            solution, test, entry_point,
            timeout_s=self.timeout_s, memory_mb=self.memory_mb, max_processes=self.max_processes,
        )


def _scored(result: SandboxResult) -> dict:
    info: dict[str, Any] = {"reason": result.reason, "wall_s": round(result.wall_s, 3)}
    if result.tampered:
        info["tampered"] = True
    return {"reward": 1.0 if result.passed else 0.0, "info": info}


def code_prompt(prompt: Any, entry_point: Any) -> str | None:
    """The prompt, when it is Python code that defines `entry_point` (HumanEval's format), else None.

    Parsed, never run: a prose instruction that merely mentions `def f(` is not code.
    """
    if not isinstance(prompt, str) or not isinstance(entry_point, str) or not _defines(prompt, entry_point):
        return None
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return prompt if entry_point in defined else None


def extract_code(text: str) -> str:
    """The longest Python fenced block (the last one on a tie), else the raw text."""
    blocks = _python_blocks(text)
    return max(reversed(blocks), key=len) if blocks else text


def _python_blocks(text: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]


def build_solution(completion: str, entry_point: str, prompt_code: str | None = None) -> str:
    """The program the solution's interpreter runs: the completion, continuing the prompt if needed."""
    code = extract_code(completion)
    if _defines(code, entry_point):
        # A full function often drops the prompt's imports (`from typing import List`) and helpers
        # (HumanEval/38's encode_cyclic): the prompt goes first, when it parses, and the
        # completion's definition replaces the prompt's docstring-only one.
        if prompt_code and _parses(prompt_code):
            return f"{prompt_code.rstrip()}\n\n\n{code}"
        head = "\n".join(line for line in (prompt_code or "").splitlines() if _is_import(line))
        return f"{head}\n{code}" if head else code
    if prompt_code:
        # A body continuation: HumanEval's convention is the prompt followed by the completion.
        # A raw continuation may go on the prompt's last line; a fenced block starts a new one.
        fenced = bool(_python_blocks(completion))
        joiner = "\n" if fenced and not prompt_code.endswith("\n") else ""
        return prompt_code + joiner + code
    return code  # the missing function then fails with a NameError, which says why


def _test_text(test: Any) -> str:
    # MBPP-style records carry a list of assert lines.
    return "\n".join(map(str, test)) if isinstance(test, (list, tuple)) else str(test)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


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
