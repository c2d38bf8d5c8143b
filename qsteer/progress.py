"""Watching a run: one live terminal view and `progress.json` in the run folder, with the same numbers.

The numbers: prompts done of the dataset's total (prompts resumed from an earlier run count as
done), records that ended in an error, prompts of failed batches (not written; a rerun redoes
them), generated tokens and tokens per second over the time the batches ran, and per role the calls
this driver made through the role's group, the calls that raised, and the tokens in the
completions they returned (`actors.roles.RoleCounts`; a cache hit is no call). Tokens move when
a policy call returns, which is a batch at a time: a workflow asks for a batch's samples in one
call, and a call's tokens come back together.

A background thread refreshes the view and rewrites `progress.json` atomically (temp file, then
rename: a reader never sees half a file) about once a second; the last write, when the run ends,
says how it ended (`state`: `finished`, `stopped` by a signal, or `failed`). With
`progress=false` only the terminal view is off. When stderr is not a terminal (a log file, `ray
job logs`) the view is one plain line whenever prompts finish. Sinks (`cluster.metrics.RayMetrics`
on Ray) get every snapshot too.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

from qsteer.results import dumps, write_atomic

REFRESH_S = 1.0  # how often the view and progress.json are refreshed


class Sink(Protocol):
    """Anything that takes the run's snapshots (Ray metrics)."""

    def update(self, snapshot: dict[str, Any]) -> None: ...


def role_counts(roles: dict[str, Any]) -> dict[str, Any]:
    """The `RoleCounts` of each role group that has them (a draft group serves the policy actors, not the driver)."""
    return {name: counts for name, group in roles.items() if (counts := getattr(group, "counts", None)) is not None}


class Progress:
    """The live numbers of one run; a context manager that starts and stops the refreshing thread."""

    def __init__(self, path: Path | None, *, workflow: str, total: int | None, done: int, show: bool = True,
                 sinks: Iterable[Sink] = (), stream: IO[str] | None = None, refresh_s: float | None = None) -> None:
        self.path = path
        self.workflow = workflow
        self.total = total
        self.resumed = done
        self.written = 0
        self.record_errors = 0
        self.unfinished = 0
        self.state = "starting"
        self.counts: dict[str, Any] = {}
        self.sinks = list(sinks)
        self.refresh_s = REFRESH_S if refresh_s is None else refresh_s
        self.started = time.perf_counter()
        self.batches_started: float | None = None
        self.batches_ended: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._view = _View(stream if stream is not None else sys.stderr) if show else None

    def watch(self, counts: dict[str, Any]) -> None:
        """Count these role groups' calls from now on (`role_counts`; groups a caller reuses across runs
        have counted earlier runs too); the batches start now."""
        with self._lock:
            self.counts = {name: (c, c.as_dict()) for name, c in counts.items()}
            self.state = "running"
            self.batches_started = time.perf_counter()

    def batches_done(self) -> None:
        """The batches are over: tokens/s stops counting time here, as the summary's does."""
        with self._lock:
            self.batches_ended = time.perf_counter()

    def advance(self, records: list[dict[str, Any]] | None = None, failed: int = 0) -> None:
        """`records` were written; `failed` prompts of a failed batch were not."""
        with self._lock:
            for record in records or ():
                self.written += 1
                self.record_errors += record.get("error") is not None
            self.unfinished += failed

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.perf_counter()
            roles = {name: {key: value - before[key] for key, value in counts.as_dict().items()}
                     for name, (counts, before) in self.counts.items()}
            tokens = sum(r["tokens"] for r in roles.values())
            generation_s = None if self.batches_started is None else (self.batches_ended or now) - self.batches_started
            return {
                "workflow": self.workflow,
                "state": self.state,
                "prompts_total": self.total,
                "prompts_done": self.resumed + self.written,
                "prompts_resumed": self.resumed,
                "prompts_unfinished": self.unfinished,
                "record_errors": self.record_errors,
                "generated_tokens": tokens,
                "tokens_per_s": round(tokens / generation_s, 2) if generation_s else None,
                "elapsed_s": round(now - self.started, 3),
                "generation_s": None if generation_s is None else round(generation_s, 3),
                "roles": roles,
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }

    def refresh(self) -> dict[str, Any]:
        """Write progress.json, tell the sinks and redraw the view, from one snapshot."""
        snap = self.snapshot()
        if self.path is not None:
            write_atomic(self.path, dumps(snap, indent=2) + "\n")
        for sink in self.sinks:
            sink.update(snap)
        if self._view is not None:
            self._view.show(snap)
        return snap

    def start(self) -> Progress:
        """Write the first snapshot (`starting`: Ray and the models are still loading) and start refreshing."""
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="qsteer-progress", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Progress:
        return self.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception as err:  # watching must never stop the run; say so once and stop watching
                print(f"qsteer: progress updates stopped: {type(err).__name__}: {err}", file=sys.stderr)
                return

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> None:
        self.close("finished" if kind is None else "stopped" if issubclass(kind, KeyboardInterrupt) else "failed")

    def close(self, state: str) -> dict[str, Any] | None:
        """Stop refreshing and write the final snapshot with how the run ended (None if it could not be written).

        Never raises: the run's shutdown and its summary come after it.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self.state = state
        try:
            return self.refresh()
        except Exception as err:
            print(f"qsteer: the final progress.json was not written: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        finally:
            if self._view is not None:
                self._view.close()
                self._view = None


class _View:
    """The terminal view: a rich live panel on a terminal, a plain line per change elsewhere."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console

        self.console = Console(file=stream)
        self.live = None
        self.last: tuple[Any, ...] | None = None
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()

    def show(self, snap: dict[str, Any]) -> None:
        if self.live is not None:
            self.live.update(render(snap), refresh=True)
            return
        key = (snap["state"], snap["prompts_done"], snap["prompts_unfinished"])
        if key != self.last:  # a log gets a line when prompts finish, not one a second
            self.last = key
            print(line(snap), file=self.console.file, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def line(snap: dict[str, Any]) -> str:
    """The snapshot on one line: `best_of_n running: 3/8 prompts, 0 errors, 1234 tokens (56.1/s); policy 4 calls ...`."""
    rate = "-" if snap["tokens_per_s"] is None else f"{snap['tokens_per_s']:.1f}"
    total = "?" if snap["prompts_total"] is None else snap["prompts_total"]  # a stream not counted first
    head = (f"{snap['workflow']} {snap['state']}: {snap['prompts_done']}/{total} prompts, "
            f"{snap['record_errors']} errors")
    if snap["prompts_unfinished"]:
        head += f", {snap['prompts_unfinished']} unfinished"
    head += f", {snap['generated_tokens']} tokens ({rate}/s), {snap['elapsed_s']:.0f} s"
    roles = "; ".join(f"{name} {c['calls']} calls {c['errors']} errors" for name, c in snap["roles"].items())
    return f"{head}; {roles}" if roles else head


def render(snap: dict[str, Any]) -> Any:
    """The rich renderable of the live view: a bar over the prompts, then calls, errors and tokens per role."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    done, total = snap["prompts_done"], snap["prompts_total"]
    rate = "-" if snap["tokens_per_s"] is None else f"{snap['tokens_per_s']:.1f}"
    head = Table.grid(padding=(0, 1))
    head.add_row(Text(f"qsteer {snap['workflow']}", style="bold"), Text(snap["state"]),
                 ProgressBar(total=None if total is None else max(total, 1), completed=done, width=30),
                 Text(f"{done}/{'?' if total is None else total} prompts"), Text(f"{snap['record_errors']} errors"),
                 Text(f"{rate} tokens/s"), Text(f"{snap['elapsed_s']:.0f} s"))
    roles = Table(box=None, padding=(0, 2), show_edge=False)
    for column in ("role", "calls", "errors", "tokens"):
        roles.add_column(column, justify="left" if column == "role" else "right")
    for name, c in snap["roles"].items():
        roles.add_row(name, str(c["calls"]), str(c["errors"]), str(c["tokens"]))
    parts = [head, roles]
    if snap["prompts_unfinished"]:
        parts.insert(1, Text(f"{snap['prompts_unfinished']} prompts in failed batches (a rerun redoes them)"))
    return Group(*parts)
