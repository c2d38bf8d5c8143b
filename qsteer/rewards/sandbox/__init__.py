"""Run untrusted Python (model output) isolated from other samples, from the host and from its verdict.

Linux only. Every sample runs inside bubblewrap (`bwrap`, Debian package `bubblewrap`), the
isolation tool Flatpak is built on: a small, audited setuid-free program that builds the
namespaces from a command line and nothing else. It was chosen over more hand-written rules
(the audit hook used to be the main wall, and issue 9 switched it off from inside) and over
containers (dockerd, gVisor) that are not installed on a laptop or inside a Ray worker.

The walls, from the kernel outwards:
- a user, pid, mount, network, ipc and uts namespace per sample (`--unshare-all`), entered by
  bwrap running as an unprivileged uid reserved for this sample alone when the caller is root
  (a lock file per uid in /run/qsteer-sandbox, so concurrent samples never share one), and
  no nested user namespaces (`--disable-userns`);
- a file system of read-only binds (/usr and the interpreter's prefix) and fresh tmpfs mounts
  of bounded size on /tmp and /dev/shm, nothing else of the host: no writable path is shared
  with another sample or the host, and nothing is left to clean up (no host folder exists, so
  no cleanup can follow a planted link);
- pid 1 of the namespace is the judge (below); when it exits or is killed at the deadline,
  the kernel kills everything else in the namespace, however it forked or `setsid`-ed;
- RLIMIT_AS, RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE and no core files;
- inside the program's interpreter, a Python audit hook refusing sockets, fork/exec, signals
  and writes outside /tmp: a second wall only, since the program can switch it off.
When any of this cannot be set up (bwrap missing, namespaces refused, no interpreter an
unprivileged uid can run), `SandboxUnavailable` is raised and nothing runs: never fail open.

The verdict. Two processes run in the sandbox (harness.py): the judge (pid 1) and the program. The judge
receives the test on a descriptor the program never sees, makes itself non-dumpable (so the
same uid cannot ptrace it or open its /proc files), starts the program in a fresh interpreter
and, for `run_tests`, executes the test's `check(candidate)` in its own interpreter, where
`candidate` forwards each call to the program over a pipe. Arguments and return values cross
as plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
frozenset), so every comparison happens outside the program's objects: an object whose
`__eq__` is its own code is refused as "tampered". The program's text is compiled alone, so
it cannot change the test's code; the judge alone writes the verdict, on a pipe to the caller.
For `run_python` the program is its own test (it passes when it runs to its end), so a hostile
program there can always claim success: use `run_tests` for solutions that are to be judged.

Cost, measured by benchmarks/bench_sandbox.py against the previous sandbox in the same run
(docs/sandbox.md): the namespaces add 10-15 ms per sample; an empty program costs the same as
before (1.01x the runs per second: the system Python starts faster than the venv's), a
HumanEval sample with its test 0.87x (the judge's interpreter and the calls over the pipe);
scoring is 99% sandbox time either way.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

UID_BASE = 1_900_000_000  # a range no distribution allocates (systemd leaves 1879048192-2147352575 unused)
UID_SLOTS = 4096
LOCK_DIR = "/run/qsteer-sandbox"
FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
BWRAP_SEARCH_PATH = "/usr/bin:/bin:/usr/local/bin"  # system folders only: never a bwrap found on $PATH
HARNESS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
HARNESS_PATH = "/qsteer/harness.py"  # where harness.py is mounted inside the sandbox
_REASON_CHARS = 500
_MAX_RECORD_BYTES = 1024 * 1024


class SandboxUnavailable(RuntimeError):
    """Isolation could not be set up, so nothing ran; the message says what is missing."""


@dataclass
class SandboxResult:
    passed: bool
    reason: str  # "passed", "timeout after 5.0s", "AssertionError: ...", "tampered: ...", "blocked: os.fork"
    returncode: int  # bwrap's exit status, which is the judge's
    stdout: str  # truncated to max_output_chars (the head)
    stderr: str  # truncated to max_output_chars (the tail, where the traceback is)
    wall_s: float
    timed_out: bool = False
    tampered: bool = False  # the program returned an object that fakes its comparisons
    net_isolated: bool = False  # the judge saw no network interface but loopback
    uid: int = -1  # the kernel uid the sample ran as (unique among running samples when root)
    pid: int = 0  # the judge's pid on the host (pid 1 inside)
    pid_namespace: int = 0  # inode of the sample's pid namespace; nothing is left in it afterwards


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: int = 16,
    tmp_mb: int = 64,
    max_output_chars: int = 4000,
    audit_hook: bool = True,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as a program; passed means it ran to its end without an error.

    The program is its own judge here; see `run_tests` for judging untrusted solutions.
    `audit_hook=False` leaves only the kernel walls; it exists to test those alone.
    """
    job = {"mode": "program", "program": code}
    return _run(job, locals())


def run_tests(
    solution: str,
    test: str,
    entry_point: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: int = 16,
    tmp_mb: int = 64,
    max_output_chars: int = 4000,
    audit_hook: bool = True,
    python: str | None = None,
) -> SandboxResult:
    """Judge `solution` by `test` as HumanEval does, with the verdict out of the solution's reach.

    `test` defines `check(candidate)`, called with the solution's `entry_point`; a test without
    `check` runs its top-level asserts against the solution's functions instead (MBPP style).
    Names the test uses but does not define (helpers and imports of the prompt) are taken from
    the solution: its functions as remote calls, its standard-library modules re-imported.
    """
    job = {"mode": "tests", "program": solution, "test": test, "entry_point": entry_point}
    return _run(job, locals())


# ---------------------------------------------------------------- caller side


def _run(job: dict, options: dict) -> SandboxResult:
    bwrap = _bwrap()
    interpreter, binds = _interpreter(options["python"])
    limits = {
        key: options[key] for key in ("timeout_s", "memory_mb", "max_processes", "max_file_mb", "audit_hook")
    }
    with _uid_slot() as uid:
        return _run_in_bwrap(job, limits, options, [bwrap, interpreter, *binds], uid)


def _run_in_bwrap(job: dict, limits: dict, options: dict, paths: list[str], uid: int | None) -> SandboxResult:
    import subprocess
    import tempfile

    timeout_s = options["timeout_s"]
    verdict_r, verdict_w = os.pipe()
    status_r, status_w = os.pipe()
    config_fd = _memfd("qsteer-sandbox-config", json.dumps({**job, **limits, "verdict_fd": verdict_w}).encode())
    harness_fd = _memfd("qsteer-sandbox-harness", _harness_source())
    argv = _bwrap_argv(paths, harness_fd, status_w, options["tmp_mb"])
    started = time.monotonic()
    deadline = started + timeout_s
    proc = None
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            # Files, not pipes, for stdout and stderr: nothing can stall us by holding them open.
            ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
            try:
                proc = subprocess.Popen(
                    argv, stdin=config_fd, stdout=out, stderr=err, env=_minimal_env(),
                    pass_fds=(harness_fd, status_w, verdict_w), close_fds=True, **ids,
                )
            except OSError as exc:
                raise SandboxUnavailable(f"could not start bubblewrap ({argv[0]}): {exc}") from exc
            for fd in (config_fd, harness_fd, status_w, verdict_w):
                os.close(fd)
            config_fd = harness_fd = status_w = verdict_w = -1
            status = _read_status_line(status_r, deadline)
            judge = _pidfd(status.get("child-pid"), proc.pid)
            timed_out = not _wait_exit(proc.pid, deadline)
            if timed_out:
                if judge is not None:
                    # Killing pid 1 tears the whole namespace down before bwrap can exit.
                    signal.pidfd_send_signal(judge, signal.SIGKILL)
                else:
                    proc.kill()
            returncode = _reap(proc, timed_out)
            if judge is not None:
                os.close(judge)
            wall_s = time.monotonic() - started
            records = _read_records(verdict_r)
            stdout = _read_head(out, options["max_output_chars"])
            stderr = _read_tail(err, options["max_output_chars"])
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            proc.wait()
        for fd in (config_fd, harness_fd, status_w, verdict_w, status_r, verdict_r):
            if fd >= 0:
                os.close(fd)
    isolated = next((r for r in records if r.get("event") == "isolated"), None)
    setup_error = next((r for r in records if r.get("event") == "setup_error"), None)
    if setup_error is not None:
        raise SandboxUnavailable(f"the sandbox refused to run: {setup_error.get('reason')}")
    if "child-pid" not in status and not timed_out:
        raise SandboxUnavailable(f"bubblewrap could not set up the sandbox: {_bwrap_error(stderr)}")
    if isolated is None and not timed_out:
        raise SandboxUnavailable(f"the sandbox's judge did not start: {_bwrap_error(stderr)}")
    if uid is not None and isolated is not None and isolated.get("uid") != uid:
        raise SandboxUnavailable(f"the sample ran as uid {isolated.get('uid')}, not the reserved {uid}")
    verdict = next((r for r in records if r.get("event") == "verdict"), None)
    passed, reason, tampered = _decide(verdict, returncode, timed_out, timeout_s)
    return SandboxResult(
        passed=passed,
        reason=reason,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        wall_s=wall_s,
        timed_out=timed_out,
        tampered=tampered,
        net_isolated=bool(isolated and isolated.get("net_isolated")),
        uid=uid if uid is not None else os.getuid(),
        pid=int(status.get("child-pid", 0)),
        pid_namespace=int(status.get("pid-namespace", 0)),
    )


def _decide(verdict: dict | None, returncode: int, timed_out: bool, timeout_s: float) -> tuple[bool, str, bool]:
    if timed_out:
        return False, f"timeout after {timeout_s}s", False
    if verdict is None:
        if returncode > 128:
            return False, f"the judge was {_describe_signal(returncode - 128)}", False
        return False, f"the judge exited with code {returncode} without a verdict", False
    passed = verdict.get("passed") is True and returncode == 0
    return passed, str(verdict.get("reason"))[:_REASON_CHARS], verdict.get("tampered") is True


def _bwrap_argv(paths: list[str], harness_fd: int, status_fd: int, tmp_mb: int) -> list[str]:
    """bwrap's command line; `paths` is [bwrap, the interpreter, folders to bind read-only]."""
    bwrap, interpreter, *binds = paths
    argv = [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
        "--die-with-parent", "--new-session", "--as-pid-1", "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):  # merged /usr: keep the link, the target is bound above
            argv += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            argv += ["--ro-bind", name, name]
    for path in binds:
        argv += ["--ro-bind", path, path]
    size = str(tmp_mb * 1024 * 1024)
    argv += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", size, "--tmpfs", "/tmp",
        "--size", size, "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev",
        "--ro-bind-data", str(harness_fd), HARNESS_PATH,
        "--remount-ro", "/",
        "--chdir", "/tmp",
        "--json-status-fd", str(status_fd),
        # -S: the judge needs the standard library only, and site-packages cost it ~10 ms.
        interpreter, "-I", "-S", "-B", HARNESS_PATH, "judge",
    ]
    return argv


def _bwrap() -> str:
    import shutil

    path = shutil.which("bwrap", path=BWRAP_SEARCH_PATH)
    if path is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed, and code is never run without it: "
            "`apt-get install -y bubblewrap` (or `make setup` as root)"
        )
    return path


_INTERPRETERS: dict[str | None, tuple[str, list[str]]] = {}


def _interpreter(requested: str | None) -> tuple[str, list[str]]:
    """(interpreter, folders to bind) for the sandbox: `requested`, else ours, else the system's.

    The sandbox's uid must be able to reach the interpreter, which pyenv or a venv under /root
    (mode 0700) forbids; then the system python3 runs the sample, with its own packages.
    """
    if requested in _INTERPRETERS:
        return _INTERPRETERS[requested]
    candidates = [requested] if requested else [sys.executable, *FALLBACK_PYTHONS]
    refusals = []
    for candidate in candidates:
        try:
            found = _probe_interpreter(candidate)
        except (OSError, ValueError) as exc:
            refusals.append(f"{candidate}: {exc}")
            continue
        _INTERPRETERS[requested] = found
        return found
    raise SandboxUnavailable("no Python interpreter that an unprivileged uid can run: " + "; ".join(refusals))


def _probe_interpreter(path: str) -> tuple[str, list[str]]:
    import subprocess

    # Folders resolved, the file name kept: a venv's python is a link, found as a venv by its name.
    path = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    _check_world_readable(os.path.realpath(path), executable=True)
    query = "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.version_info[:2]]))"
    out = subprocess.run([path, "-I", "-S", "-c", query], capture_output=True, text=True, timeout=30, check=True)
    *prefixes, version = json.loads(out.stdout)
    if tuple(version) < (3, 10):
        raise ValueError(f"Python {version[0]}.{version[1]} is older than the 3.10 the harness needs")
    binds = set()
    for prefix in {os.path.realpath(p) for p in prefixes} | {os.path.dirname(os.path.dirname(path))}:
        _check_world_readable(prefix)
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            binds.add(prefix)
    return path, sorted(binds)


def _check_world_readable(path: str, executable: bool = False) -> None:
    """Raise unless every folder above `path` is searchable, and `path` readable, by others."""
    current = "/"
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            raise PermissionError(f"{current} is not searchable by other users")
    mode = os.stat(path).st_mode
    need = stat.S_IXOTH if executable or stat.S_ISDIR(mode) else stat.S_IROTH
    if not mode & need:
        raise PermissionError(f"{path} is not readable by other users")


class _uid_slot:  # noqa: N801 - used as a context manager, like a function
    """Hold a uid from the reserved range for one sample (root), or use ours (not root).

    flock on a file per uid: released by the kernel if this process dies, and exclusive across
    every process and thread of the machine that uses the same folder.
    """

    _dir_fd = -1
    _dir_lock = threading.Lock()  # the first samples of a thread pool arrive together

    def __enter__(self) -> int | None:
        if os.geteuid() != 0:
            return None  # then bwrap maps our own uid; see docs/sandbox.md
        import fcntl
        import secrets

        dir_fd = self._lock_dir()
        start = secrets.randbelow(UID_SLOTS)
        for step in range(UID_SLOTS):
            slot = (start + step) % UID_SLOTS
            fd = os.open(str(slot), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.fd = fd
            return UID_BASE + slot
        raise SandboxUnavailable(f"all {UID_SLOTS} sandbox uids are in use")

    def __exit__(self, *exc: object) -> None:
        if hasattr(self, "fd"):
            os.close(self.fd)

    @classmethod
    def _lock_dir(cls) -> int:
        with cls._dir_lock:
            return cls._open_lock_dir()

    @classmethod
    def _open_lock_dir(cls) -> int:
        if cls._dir_fd < 0:
            try:
                try:
                    os.mkdir(LOCK_DIR, 0o700)
                except FileExistsError:
                    pass
                fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise SandboxUnavailable(f"cannot use {LOCK_DIR} to reserve sandbox uids: {exc}") from exc
            info = os.fstat(fd)
            if info.st_uid != 0 or info.st_mode & 0o022:
                os.close(fd)
                raise SandboxUnavailable(f"{LOCK_DIR} must be a folder owned by root and writable by it alone")
            cls._dir_fd = fd
        return cls._dir_fd


_HARNESS: bytes | None = None


def _harness_source() -> bytes:
    global _HARNESS
    if _HARNESS is None:
        with open(HARNESS_FILE, "rb") as f:
            _HARNESS = f.read()
    return _HARNESS


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _minimal_env() -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        # Each glibc malloc arena reserves 64 MB of address space, which RLIMIT_AS counts.
        "MALLOC_ARENA_MAX": "2",
        # BLAS pools start one thread per core; threads count against RLIMIT_NPROC.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read_status_line(fd: int, deadline: float) -> dict:
    """bwrap's first status document (it names the sandbox's pid 1), or {} if it never came."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return {}
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        status = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def _pidfd(pid: object, parent: int) -> int | None:
    """A pidfd for bwrap's child, checked to still be bwrap's child (so never a reused pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
        if int(stat_line[stat_line.rindex(b")") + 2 :].split()[1]) == parent:
            return fd
    except (OSError, ValueError, IndexError):
        pass
    os.close(fd)
    return None


def _wait_exit(pid: int, deadline: float) -> bool:
    """Wait for our child `pid` to exit, without reaping it; False at the deadline."""
    fd = os.pidfd_open(pid)
    try:
        remaining = max(0.0, deadline - time.monotonic())
        return bool(select.select([fd], [], [], remaining)[0])
    finally:
        os.close(fd)


def _reap(proc: Any, timed_out: bool) -> int:
    try:
        return proc.wait(timeout=5.0 if timed_out else 30.0)
    except Exception:  # bwrap itself stuck: take it down; --die-with-parent takes the rest
        proc.kill()
        return proc.wait()


def _read_records(fd: int) -> list[dict]:
    """The judge's JSON lines. Only the judge holds this pipe, but it is parsed as untrusted."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < _MAX_RECORD_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    records = []
    for line in b"".join(chunks).decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_head(f: IO[bytes], limit: int) -> str:
    f.seek(0)
    data = f.read(limit * 4).decode("utf-8", errors="replace")
    return data if len(data) <= limit else data[:limit] + "\n...[truncated]"


def _read_tail(f: IO[bytes], limit: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit * 4))
    data = f.read().decode("utf-8", errors="replace")
    return data if size <= limit else "[truncated]...\n" + data[-limit:]


def _bwrap_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("bwrap:")]
    return (lines[-1] if lines else stderr.strip().splitlines()[-1] if stderr.strip() else "no message")[:300]


def _describe_signal(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown"
    why = {"SIGXCPU": ", CPU time limit", "SIGXFSZ": ", file size limit"}.get(name, "")
    return f"killed by signal {signum} ({name}{why})"
