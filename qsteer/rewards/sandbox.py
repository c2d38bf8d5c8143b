"""Run untrusted Python (model output) in a limited child process, never in the caller's.

Linux only. Everything here is done by hand with the standard library: no installed
library runs code with these limits, and the heavier isolators (containers, gVisor,
firejail) are not available on a laptop or inside a Ray worker.

The walls, from the kernel outwards to the interpreter:
- a fresh process session and group, SIGKILLed as a whole when the run ends, whatever happens;
- a wall-clock deadline kept by the parent, and RLIMIT_CPU as a backstop in the child;
- RLIMIT_AS (memory), RLIMIT_NPROC (processes), RLIMIT_FSIZE (file size), no core dumps;
- an unprivileged uid (`nobody`) when the caller is root, because root ignores RLIMIT_NPROC,
  may signal any process and may write anywhere;
- a private temporary folder as cwd, HOME and TMPDIR, removed afterwards; a minimal env;
- a new network namespace (no interfaces, not even loopback) where the kernel allows it;
- a Python audit hook, installed before the code runs, that refuses sockets, signals to other
  processes, fork/exec/subprocess, and writes outside the private folder.

This same file is the harness: the child runs `python -I -B sandbox.py CONFIG`, which sets the
limits, drops privileges, installs the hook and then executes the code file. It therefore
imports only the standard library, and `subprocess` only inside `_start_harness` (see there).

What it does not stop: code that defeats the audit hook from inside the interpreter (the hook
is a speed bump; the kernel limits above are the walls), reading world-readable files, and a
process that escapes both the group and the session (that needs fork, which is refused).
Killed processes stay zombies until init reaps them, and count against `nobody`'s
RLIMIT_NPROC until then; concurrent sandboxes share that uid and its count.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from subprocess import Popen

SANDBOX_USER = "nobody"
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_AF_UNIX = 1
_REASON_CHARS = 500
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclass
class SandboxResult:
    passed: bool
    reason: str  # "passed", "timeout after 5.0s", "AssertionError: ...", "blocked: os.fork", ...
    returncode: int  # negative: killed by that signal
    stdout: str  # truncated to max_output_chars (the head)
    stderr: str  # truncated to max_output_chars (the tail, where the traceback is)
    wall_s: float
    timed_out: bool = False
    net_isolated: bool = False  # whether the child got its own network namespace
    pid: int = 0  # the child's pid, which is also its session and process group id


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: int = 16,
    max_output_chars: int = 4000,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run `code` as a program in a sandboxed child; passed means it ran to its end without error.

    `audit_hook=False` leaves only the kernel-level limits; it exists to test those alone.
    """
    limits = {
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "max_processes": max_processes,
        "max_file_mb": max_file_mb,
        "audit_hook": audit_hook,
    }
    # The nonce proves that the harness, not the code, wrote the final "passed" line.
    nonce = secrets.token_hex(16)
    private_dir = os.path.realpath(tempfile.mkdtemp(prefix="qsteer_sandbox_"))
    report_r, report_w = os.pipe()
    started = time.monotonic()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            # Files, not pipes, for stdout and stderr: nothing can stall us by holding them open.
            proc = _start_harness(code, private_dir, limits, report_w, nonce, out, err)
            os.close(report_w)
            report_w = -1
            try:
                timed_out = not _wait_unreaped(proc.pid, started + timeout_s)
            finally:  # whatever happened, nothing of the run outlives it
                _kill_session(proc.pid)
                returncode = proc.wait()
            wall_s = time.monotonic() - started
            stdout = _read_head(out, max_output_chars)
            stderr = _read_tail(err, max_output_chars)
        records = _read_records(report_r)
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
        _remove_tree(private_dir)
    passed, reason = _judge(records, nonce, proc.pid, returncode, timed_out, timeout_s)
    isolated = next((r for r in records if r.get("event") == "isolated"), {})  # the harness's, first
    return SandboxResult(
        passed=passed,
        reason=reason,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        wall_s=wall_s,
        timed_out=timed_out,
        net_isolated=bool(isolated.get("net")),
        pid=proc.pid,
    )


def _start_harness(
    code: str, private_dir: str, limits: dict, report_fd: int, nonce: str, out: IO[bytes], err: IO[bytes]
) -> Popen:
    """Start this file as the harness in a new session."""
    # Imported here, not at the top: this file is also the harness, and a harness that had
    # loaded subprocess would hand the untrusted code `_posixsubprocess.fork_exec`, which
    # raises no audit event.
    import subprocess

    code_path = os.path.join(private_dir, "main.py")
    with open(code_path, "w", encoding="utf-8") as f:
        f.write(code)
    ids = _sandbox_ids()
    if ids is not None:
        # The code runs as `nobody` and needs its folder (and its own file, for tracebacks).
        os.chown(private_dir, *ids)
        os.chown(code_path, *ids)
    config = {"code_path": code_path, "report_fd": report_fd, "ids": ids, **limits}
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=out,
        stderr=err,
        cwd=private_dir,
        env=_minimal_env(private_dir),
        pass_fds=(report_fd,),
        start_new_session=True,
    )
    try:
        proc.stdin.write(nonce.encode() + b"\n")
        proc.stdin.close()
    except OSError:  # the child died before reading it; its exit status says why
        pass
    return proc


# ---------------------------------------------------------------- parent side


def _sandbox_ids() -> tuple[int, int] | None:
    """(uid, gid) to drop to, or None when we are not root (then we already are unprivileged)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _minimal_env(private_dir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": private_dir,
        "TMPDIR": private_dir,
        "LANG": "C.UTF-8",
        # Each glibc malloc arena reserves 64 MB of address space, which RLIMIT_AS counts.
        "MALLOC_ARENA_MAX": "2",
        # BLAS pools start one thread per core; threads count against RLIMIT_NPROC.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait for `pid` to exit without reaping it; False at the deadline.

    Left as a zombie, the pid cannot be reused, so killing its group and session afterwards
    can never hit an unrelated process.
    """
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # someone else in this process reaped it
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _kill_session(sid: int) -> None:
    """SIGKILL the child's process group, then anything else alive in its session, and wait
    (up to a second) until none of it runs: only zombies, for init to reap, may remain."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # A descendant may have moved to a group of its own, but not out of the session
    # without setsid, which needs a fork the hook refuses.
    deadline = time.monotonic() + 1.0
    while (alive := _live_session_members(sid)) and time.monotonic() < deadline:
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _live_session_members(sid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # After the command name in parentheses: state, ppid, pgrp, session, ...
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def _read_head(f, limit: int) -> str:
    f.seek(0)
    data = f.read(limit * 4).decode("utf-8", errors="replace")
    return data if len(data) <= limit else data[:limit] + "\n...[truncated]"


def _read_tail(f, limit: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit * 4))
    data = f.read().decode("utf-8", errors="replace")
    return data if size <= limit else "[truncated]...\n" + data[-limit:]


def _read_records(fd: int) -> list[dict]:
    """The harness's JSON lines; read without blocking, since a stray process may hold the pipe."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    records = []
    for line in b"".join(chunks).decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the code can write to this pipe too; garbage is ignored
        if isinstance(record, dict):
            records.append(record)
    return records


def _judge(
    records: list[dict], nonce: str, pid: int, returncode: int, timed_out: bool, timeout_s: float
) -> tuple[bool, str]:
    setup_error = [r for r in records if r.get("event") == "setup_error"]
    if setup_error:
        return False, f"sandbox setup failed: {setup_error[0].get('reason')}"
    blocked = [r for r in records if r.get("event") == "blocked"]
    if blocked:  # an attempt that was refused fails the run even if the code caught the error
        return False, f"blocked: {blocked[0].get('what')}"
    if timed_out:
        return False, f"timeout after {timeout_s}s"
    finished = [
        r for r in records if r.get("event") == "finished" and r.get("nonce") == nonce and r.get("pid") == pid
    ]
    if finished and finished[-1].get("passed") and returncode == 0:
        return True, "passed"
    if finished and not finished[-1].get("passed"):
        return False, str(finished[-1].get("reason"))
    if returncode < 0:
        return False, _describe_signal(-returncode)
    return False, f"exited with code {returncode} before the program finished"


def _describe_signal(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown"
    why = {"SIGXCPU": ", CPU time limit", "SIGXFSZ": ", file size limit"}.get(name, "")
    return f"killed by signal {signum} ({name}{why})"


def _remove_tree(path: str) -> None:
    # The code may have left folders without write or search permission; give them back
    # so that a non-root caller can delete everything.
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            try:
                os.chmod(os.path.join(root, name), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- child side (the harness)


def _harness_main(config: dict) -> None:
    report_fd = config["report_fd"]

    def report(**record: object) -> None:
        os.write(report_fd, (json.dumps(record) + "\n").encode())

    # Loaded while the whole file system is still readable; needed after the code fails.
    import linecache  # noqa: F401
    import traceback
    import types

    nonce = sys.stdin.readline().strip()
    private_dir = os.path.realpath(os.getcwd())
    code_path = config["code_path"]
    try:
        with open(code_path, encoding="utf-8") as f:
            source = f.read()
        ids = config["ids"]
        net_isolated = _unshare_network(as_root=ids is not None)
        _set_limits(config)
        if ids is not None:
            _reroute_imports_through_fds()
            _drop_privileges(*ids)
        report(event="isolated", net=net_isolated, uid=os.getuid())
        if config["audit_hook"]:
            _install_audit_hook(private_dir, report)
    except Exception as exc:  # never run the code with half of the walls up
        report(event="setup_error", reason=f"{type(exc).__name__}: {exc}")
        os._exit(70)

    module = types.ModuleType("__main__")
    module.__file__ = code_path
    sys.modules["__main__"] = module  # pickle, dataclasses and friends look the code up here
    sys.argv = [code_path]
    try:
        exec(compile(source, code_path, "exec"), module.__dict__)
        passed, reason = True, "passed"
    except SystemExit as exc:  # an early exit must not read as "all tests ran"
        passed, reason = False, f"SystemExit({exc.code!r}) before the end of the program"
    except BaseException as exc:
        passed, reason = False, _describe_exception(exc, code_path)
        try:
            traceback.print_exception(exc)
        except BaseException:
            pass
    # The pid tells this process's verdict from that of a child it might have forked.
    report(event="finished", passed=passed, reason=reason[:_REASON_CHARS], nonce=nonce, pid=os.getpid())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)  # skips atexit handlers and non-daemon threads the code may have left


def _unshare_network(as_root: bool) -> bool:
    """Enter a new, empty network namespace when the kernel lets us; False otherwise."""
    # Without root, a new user namespace is what permits the network namespace.
    flags = _CLONE_NEWNET if as_root else _CLONE_NEWUSER | _CLONE_NEWNET
    try:
        import ctypes

        ok = ctypes.CDLL(None, use_errno=True).unshare(flags) == 0
    except (ImportError, OSError, AttributeError):
        ok = False
    # Forget ctypes, so that the code's own `import ctypes` meets the audit hook.
    for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
        del sys.modules[name]
    return ok


def _set_limits(config: dict) -> None:
    megabyte = 1024 * 1024
    cpu_s = math.ceil(config["timeout_s"]) + 1
    limits = {
        # Backstop for the parent's wall clock: CPU burnt by a process that escaped the kill.
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        # Address space: a runaway allocation fails with MemoryError instead of swapping the host.
        resource.RLIMIT_AS: (config["memory_mb"] * megabyte,) * 2,
        # Processes and threads of this uid: a fork bomb stops at this count.
        resource.RLIMIT_NPROC: (config["max_processes"],) * 2,
        # Largest file it may write (stdout included), so it cannot fill the disk.
        resource.RLIMIT_FSIZE: (config["max_file_mb"] * megabyte,) * 2,
        # A crash must not drop a core file the size of the address space.
        resource.RLIMIT_CORE: (0, 0),
    }
    for kind, (soft, hard) in limits.items():
        resource.setrlimit(kind, (soft, hard))


def _reroute_imports_through_fds() -> None:
    """Keep the standard library importable after dropping privileges.

    The interpreter may live where `nobody` cannot enter (pyenv under /root, mode 0700).
    Directories opened now, while privileged, stay usable through /proc/self/fd/N, which
    the kernel resolves without checking the path above them.
    """
    roots: dict[str, str] = {}
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            real = os.path.realpath(entry)
            if real not in roots:
                fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                roots[real] = f"/proc/self/fd/{fd}"

    def reroute(path: str) -> str:
        real = os.path.realpath(path)
        for root, via_fd in roots.items():
            if real == root or real.startswith(root + os.sep):
                return via_fd + real[len(root) :]
        return path

    sys.path[:] = list(roots.values())
    sys.path_importer_cache.clear()
    for module in list(sys.modules.values()):  # packages already loaded import submodules lazily
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):
            package_path[:] = [reroute(p) for p in package_path]


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise PermissionError(f"could not drop to uid {uid}")
    os.umask(0o077)


# Events refused outright. os.spawn* and pty go through os.fork / os.forkpty.
_DENIED_EVENTS = frozenset(
    {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.system", "subprocess.Popen", "os.killpg"}
)
# Modules that reach past the hook: raw C calls, fork_exec without an event (preloaded
# disarmed), interpreters without our hook, CPython's test internals.
_DENIED_IMPORTS = frozenset(
    {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi"}
)
# Path-changing events: positions of their path arguments and of their dir_fd arguments.
_PATH_EVENTS = {
    "os.mkdir": ((0,), (2,)),
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((0, 1), (2,)),
    "os.truncate": ((0,), ()),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.utime": ((0,), (3,)),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
}


def _install_audit_hook(private_dir: str, report) -> None:
    own_pid = os.getpid()
    writable = (private_dir, "/dev/null")

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return any(real == root or real.startswith(root + os.sep) for root in writable)

    def deny(what: str) -> None:
        report(event="blocked", what=what)
        raise PermissionError(f"blocked: {what} is not allowed in the sandbox")

    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS or event.startswith("ctypes."):
            deny(event)
        elif event == "import":
            if args[0] in _DENIED_IMPORTS:
                # ImportError, so that optional imports (numpy's `try: import ctypes`) go on.
                raise ImportError(f"blocked: import {args[0]} is not allowed in the sandbox")
        elif event.startswith("socket."):
            # Unix socket pairs (asyncio's self-pipe) are local to this process; nothing else is.
            if not (event == "socket.__new__" and args[1] == _AF_UNIX):
                deny(event)
        elif event == "os.kill":
            if args[0] != own_pid:
                deny(f"os.kill({args[0]}, {args[1]})")
        elif event == "open":
            path, mode, flags = args
            writes = bool(flags & _WRITE_FLAGS)
            # os.open (mode None) hides its dir_fd from the event, so a directory opened
            # outside could anchor a later write: no descriptors of outside folders either.
            anchors = mode is None and not isinstance(path, int) and os.path.isdir(path)
            if (writes or anchors) and not inside(path):
                deny(f"open({path!r}, {'w' if writes else 'dir'})")
        elif event in _PATH_EVENTS:
            path_positions, fd_positions = _PATH_EVENTS[event]
            # The events show an absent dir_fd as -1 (or None).
            if any(args[i] not in (None, -1) for i in fd_positions if i < len(args)):
                deny(f"{event} with dir_fd")
            for i in path_positions:
                if not inside(args[i]):
                    deny(f"{event}({args[i]!r})")

    # subprocess (and asyncio, which imports it) must stay importable, but its C helper
    # forks without an audit event: load it now, disarmed; a fresh import of it is denied.
    import _posixsubprocess

    def fork_exec(*args: object, **kwargs: object) -> None:
        deny("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = fork_exec
    sys.addaudithook(hook)


def _describe_exception(exc: BaseException, code_path: str) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        frames = [f for f in _traceback_frames(exc) if f[0] == code_path]
        if frames:
            lineno, line = frames[-1][1], frames[-1][2]
            text += f" (line {lineno}: {line})" if line else f" (line {lineno})"
        return text
    except BaseException:  # e.g. MemoryError again while formatting
        return type(exc).__name__


def _traceback_frames(exc: BaseException) -> list[tuple[str, int, str]]:
    import linecache  # already loaded by the harness before the hook went in

    frames = []
    tb = exc.__traceback__
    while tb is not None:
        filename, lineno = tb.tb_frame.f_code.co_filename, tb.tb_lineno
        frames.append((filename, lineno, linecache.getline(filename, lineno).strip()))
        tb = tb.tb_next
    return frames


if __name__ == "__main__":
    _harness_main(json.loads(sys.argv[1]))
