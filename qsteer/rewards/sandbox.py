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

The verdict. Two processes run in the sandbox: the judge (pid 1) and the program. The judge
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

Cost, measured by benchmarks/bench_sandbox.py (docs/sandbox.md): the namespaces add ~10 ms per
sample; with the judge's second interpreter, a HumanEval sample went from 131 to 160 ms on this
2-core machine (0.82x the samples per second), and scoring is 99% sandbox time either way.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import stat
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import IO, Any

if __name__ == "__main__":  # the harness: skip what only the caller needs (dataclasses imports ~30 ms)

    def dataclass(cls: type) -> type:
        return cls

else:
    from dataclasses import dataclass

HARNESS_PATH = "/qsteer/harness.py"  # where this file is mounted inside the sandbox
SOLUTION_NAME = "/qsteer/solution.py"  # names for tracebacks; neither is a file the program can see
TEST_NAME = "/qsteer/test.py"
UID_BASE = 1_900_000_000  # a range no distribution allocates (systemd leaves 1879048192-2147352575 unused)
UID_SLOTS = 4096
LOCK_DIR = "/run/qsteer-sandbox"
FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
BWRAP_SEARCH_PATH = "/usr/bin:/bin:/usr/local/bin"  # system folders only: never a bwrap found on $PATH
_REASON_CHARS = 500
_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_MAX_DEPTH = 100
_MAX_ITEMS = 1_000_000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_AF_UNIX = 1


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
    import subprocess  # the harness never needs it before the program runs; see _install_audit_hook
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
        with open(os.path.abspath(__file__), "rb") as f:
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
    while size < _MAX_MESSAGE_BYTES:
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


# ---------------------------------------------------------------- plain data across the pipe


class _Tampered(Exception):
    pass


class _TooBig(Exception):
    pass


def _encode(value: object, budget: list[int], depth: int = 0) -> object:
    """`value` as JSON-ready plain data; raises _Tampered for objects that fake comparisons."""
    budget[0] -= 1
    if depth > _MAX_DEPTH:
        raise _TooBig(f"nested more than {_MAX_DEPTH} levels deep")
    if budget[0] < 0:
        raise _TooBig(f"more than {_MAX_ITEMS} items")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -(2**53) < value < 2**53 else ["int", hex(value)]
    if kind is float:
        return ["float", value.hex()]
    if kind is complex:
        return ["complex", value.real.hex(), value.imag.hex()]
    if kind in (bytes, bytearray):
        return [kind.__name__, bytes(value).hex()]
    if kind in (list, tuple, set, frozenset):
        return [kind.__name__, [_encode(item, budget, depth + 1) for item in value]]
    if kind is dict:
        return ["dict", [[_encode(k, budget, depth + 1), _encode(v, budget, depth + 1)] for k, v in value.items()]]
    if _fakes_comparison(kind):
        raise _Tampered(f"returned a {kind.__qualname__}, whose __eq__ is its own code, not plain data")
    for base in (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset):
        if isinstance(value, base):  # numpy.float64 and friends: their plain value
            return _encode(base(value), budget, depth)
    return ["opaque", kind.__qualname__]


def _fakes_comparison(kind: type) -> bool:
    import types

    for name in ("__eq__", "__ne__"):
        for klass in kind.__mro__:
            if name in vars(klass):
                if isinstance(vars(klass)[name], (types.FunctionType, types.MethodType, staticmethod, classmethod)):
                    return True
                break
    return False


class Opaque:
    """A value of a type that cannot cross as plain data: equal to nothing but itself."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object from the program>"


def _decode(data: object, depth: int = 0) -> object:
    if depth > _MAX_DEPTH + 2:
        raise ValueError("nested too deeply")
    if data is None or type(data) in (bool, str, int, float):
        return data
    if type(data) is not list or not data or type(data[0]) is not str:
        raise ValueError(f"not an encoded value: {type(data).__name__}")
    tag, *rest = data
    if tag == "int":
        return int(rest[0], 16)
    if tag == "float":
        return float.fromhex(rest[0])
    if tag == "complex":
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag in ("bytes", "bytearray"):
        return (bytes if tag == "bytes" else bytearray).fromhex(rest[0])
    if tag in ("list", "tuple", "set", "frozenset"):
        container = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag]
        return container(_decode(item, depth + 1) for item in rest[0])
    if tag == "dict":
        return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in rest[0]}
    if tag == "opaque":
        return Opaque(str(rest[0]))
    raise ValueError(f"unknown tag {tag!r}")


class _Lines:
    """Newline-delimited JSON over a pipe, with a size cap on what is read."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd, self.buffer = read_fd, write_fd, b""

    def send(self, message: dict) -> None:
        data = memoryview((json.dumps(message) + "\n").encode())
        while data:
            data = data[os.write(self.write_fd, data) :]

    def receive(self) -> dict | None:
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_MESSAGE_BYTES:
                raise _TooBig(f"a message over {_MAX_MESSAGE_BYTES} bytes")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("a message that is not an object")
        return message


# ---------------------------------------------------------------- the judge (pid 1, trusted)


class _Verdict(BaseException):
    """Ends the test with a failure the test's own `except Exception` cannot swallow."""

    def __init__(self, reason: str, tampered: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.tampered = reason, tampered


def _judge_main() -> None:
    config = json.loads(sys.stdin.buffer.read())
    verdict_fd = config.pop("verdict_fd")
    os.set_inheritable(verdict_fd, False)

    def report(**record: object) -> None:
        data = (json.dumps(record) + "\n").encode()
        while data:
            data = data[os.write(verdict_fd, data) :]

    try:
        _setup_judge(config)
        report(event="isolated", uid=os.getuid(), net_isolated=True)
    except Exception as exc:  # never run the program with half of the walls up
        report(event="setup_error", reason=f"{type(exc).__name__}: {exc}")
        os._exit(70)
    try:
        passed, reason, tampered = _judge(config)
    except _Verdict as verdict:
        passed, reason, tampered = False, verdict.reason, verdict.tampered
    except BaseException as exc:  # the judge's own failure is the sample's failure, with the reason
        passed, reason, tampered = False, f"judge error: {type(exc).__name__}: {exc}", False
    report(event="verdict", passed=passed, reason=reason[:_REASON_CHARS], tampered=tampered)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)  # pid 1 exits: the kernel kills whatever the program left


def _setup_judge(config: dict) -> None:
    import ctypes
    import socket

    # Nothing of the test may stay reachable through stdin, which the program would inherit.
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_get_dumpable, pr_set_dumpable = 3, 4
    # Non-dumpable: the program (same uid) can neither ptrace this process nor open its /proc
    # files, its descriptors (the verdict pipe) or its memory (the test).
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0 or libc.prctl(pr_get_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "could not make the judge non-dumpable")
    # pid 1 receives only the signals it handles; ignoring SIGINT leaves the program none.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getpid() != 1:
        raise RuntimeError(f"the judge is pid {os.getpid()}, not pid 1 of a new pid namespace")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise RuntimeError("the sandbox runs as root")
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        raise RuntimeError(f"the network namespace has interfaces {interfaces}")
    _set_limits(config)


def _set_limits(config: dict) -> None:
    import resource

    megabyte = 1024 * 1024
    cpu_s = math.ceil(config["timeout_s"]) + 1
    limits = {
        # Backstop for the caller's wall clock.
        resource.RLIMIT_CPU: (cpu_s, cpu_s + 1),
        # Address space: a runaway allocation fails with MemoryError instead of swapping the host.
        resource.RLIMIT_AS: (config["memory_mb"] * megabyte,) * 2,
        # Processes and threads of this uid (the judge counts one): a fork bomb stops here.
        resource.RLIMIT_NPROC: (config["max_processes"],) * 2,
        # Largest file it may write, stdout and stderr included.
        resource.RLIMIT_FSIZE: (config["max_file_mb"] * megabyte,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for kind, pair in limits.items():
        resource.setrlimit(kind, pair)


def _judge(config: dict) -> tuple[bool, str, bool]:
    import subprocess

    to_program_r, to_program_w = os.pipe()
    from_program_r, from_program_w = os.pipe()
    program = subprocess.Popen(
        [sys.executable, "-I", "-B", HARNESS_PATH, "program", str(to_program_r), str(from_program_w)],
        stdin=subprocess.DEVNULL,
        pass_fds=(to_program_r, from_program_w),
        close_fds=True,
    )
    os.close(to_program_r)
    os.close(from_program_w)
    channel = _Channel(_Lines(from_program_r, to_program_w), program)
    try:
        channel.lines.send(
            {"source": config["program"], "mode": config["mode"], "audit_hook": config["audit_hook"]}
        )
    except BrokenPipeError:
        pass  # it died starting; the next receive says so
    first = channel.receive_or_exit("before its end")
    blocked = first.get("blocked") or []
    if first.get("event") == "failed":
        return False, _blocked_reason(blocked) or str(first.get("reason")), False
    if first.get("event") not in ("finished", "ready"):
        return False, "the program sent a malformed first message", False
    if config["mode"] == "program":
        if first.get("event") != "finished":
            return False, "the program sent a malformed first message", False
        return (False, _blocked_reason(blocked), False) if blocked else (True, "passed", False)
    return _run_test(config, first, channel)


def _blocked_reason(blocked: list) -> str:
    return f"blocked: {blocked[0]}" if blocked else ""


class _Channel:
    def __init__(self, lines: _Lines, program: Any) -> None:
        self.lines, self.program = lines, program
        self.tampered: str | None = None
        self.blocked: list = []

    def receive_or_exit(self, when: str) -> dict:
        try:
            message = self.lines.receive()
        except _TooBig as exc:
            raise _Verdict(f"output rejected: {exc}") from None
        except (ValueError, RecursionError, MemoryError):
            raise _Verdict("output rejected: a malformed message from the program") from None
        if message is None:
            code = self.program.wait()
            raise _Verdict(f"the program exited with code {code} {when}")
        if isinstance(message.get("blocked"), list):
            self.blocked += message["blocked"]
        return message

    def call(self, name: str, args: tuple, kwargs: dict) -> object:
        try:
            payload = {"call": name, "args": _encode(list(args), [_MAX_ITEMS]), "kwargs": _encode(kwargs, [_MAX_ITEMS])}
        except (_Tampered, _TooBig) as exc:
            raise _Verdict(f"unsupported test: it passes the candidate something that is not plain data ({exc})") from None
        try:
            self.lines.send(payload)
        except BrokenPipeError:
            pass
        reply = self.receive_or_exit(f"during a call of {name}")
        if self.blocked:
            raise _Verdict(_blocked_reason(self.blocked))
        if "tampered" in reply:
            self.tampered = f"tampered: {name} {reply['tampered']}"
            raise _Verdict(self.tampered, tampered=True)
        if "return" in reply:
            try:
                return _decode(reply["return"])
            except (ValueError, TypeError, KeyError, IndexError, RecursionError, MemoryError) as exc:
                raise _Verdict(f"output rejected: {exc}") from None
        if "raise" in reply:
            raise _rebuilt_exception(reply["raise"])
        if "exit" in reply:
            raise _Verdict(f"the program exited during a call of {name}: {reply['exit']}")
        if "rejected" in reply:
            raise _Verdict(f"output rejected: {name} {reply['rejected']}")
        raise _Verdict("output rejected: a malformed reply from the program")


class _Remote:
    """A function of the program, as the test sees it: calls go over the pipe as plain data."""

    def __init__(self, name: str, channel: _Channel) -> None:
        self.__name__ = self.__qualname__ = name
        self._channel = channel

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<function {self.__name__} of the program>"


def _rebuilt_exception(raised: object) -> BaseException:
    import builtins

    name, message = (str(raised[0]), str(raised[1])) if isinstance(raised, list) and len(raised) == 2 else ("Exception", "")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:
            pass
    return type(name if name.isidentifier() else "ProgramError", (Exception,), {})(message)


def _run_test(config: dict, ready: dict, channel: _Channel) -> tuple[bool, str, bool]:
    import importlib
    import linecache
    import traceback

    test, entry_point = config["test"], config["entry_point"]
    linecache.cache[TEST_NAME] = (len(test), None, test.splitlines(True), TEST_NAME)
    try:
        code = compile(test, TEST_NAME, "exec")
    except SyntaxError as exc:
        return False, f"the test does not compile: {exc}", False
    wanted = _names_used(code) | {entry_point}
    namespace: dict[str, object] = {"__name__": "__main__"}
    names = ready.get("names") if isinstance(ready.get("names"), dict) else {}
    for name, kind in names.items():
        if name not in wanted or not isinstance(kind, list) or not kind:
            continue
        if kind[0] == "function":
            namespace[name] = _Remote(name, channel)
        elif kind[0] == "module" and str(kind[1]).split(".")[0] in sys.stdlib_module_names:
            try:
                namespace[name] = importlib.import_module(str(kind[1]))
            except Exception:
                pass
        elif kind[0] == "value":
            try:
                namespace[name] = _decode(kind[1])
            except (ValueError, TypeError, KeyError, IndexError, RecursionError):
                pass
    try:
        exec(code, namespace)
        if "check" in namespace:
            if entry_point not in namespace:
                raise NameError(f"name {entry_point!r} is not defined")
            namespace["check"](namespace[entry_point])
        passed, reason = True, "passed"
    except _Verdict as verdict:
        passed, reason = False, verdict.reason
    except BaseException as exc:
        passed, reason = False, _describe_exception(exc, TEST_NAME)
        try:
            traceback.print_exception(exc)
        except BaseException:
            pass
    # Sticky: a test that swallowed the failure with a bare except does not pass either.
    if channel.tampered:
        return False, channel.tampered, True
    if channel.blocked:
        return False, _blocked_reason(channel.blocked), False
    return passed, reason, False


def _names_used(code: Any) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


# ---------------------------------------------------------------- the program (untrusted)


def _program_main(read_fd: int, write_fd: int) -> None:
    # Loaded while nothing is hostile yet; needed after the code fails.
    import linecache
    import traceback
    import types

    lines = _Lines(read_fd, write_fd)
    first = lines.receive() or {}
    source, mode = first.get("source", ""), first.get("mode")
    blocked: list[str] = []
    if first.get("audit_hook"):
        _install_audit_hook(blocked)
    linecache.cache[SOLUTION_NAME] = (len(source), None, source.splitlines(True), SOLUTION_NAME)
    module = types.ModuleType("__main__")
    module.__file__ = SOLUTION_NAME
    sys.modules["__main__"] = module  # pickle, dataclasses and friends look the code up here
    sys.argv = [SOLUTION_NAME]
    try:
        exec(compile(source, SOLUTION_NAME, "exec"), module.__dict__)
    except SystemExit as exc:  # an early exit must not read as "all tests ran"
        _send_and_exit(lines, {"event": "failed", "reason": f"SystemExit({exc.code!r}) before the end of the program", "blocked": blocked})
    except BaseException as exc:
        reason = _describe_exception(exc, SOLUTION_NAME)
        try:
            traceback.print_exception(exc)
        except BaseException:
            pass
        _send_and_exit(lines, {"event": "failed", "reason": reason[:_REASON_CHARS], "blocked": blocked})
    if mode == "program":
        _send_and_exit(lines, {"event": "finished", "blocked": blocked})
    lines.send({"event": "ready", "names": _describe_names(module.__dict__), "blocked": blocked})
    while True:
        request = lines.receive()
        if request is None:
            _send_and_exit(None, {})
        lines.send(_serve(module.__dict__, request, blocked))


def _serve(namespace: dict, request: dict, blocked: list) -> dict:
    name = request.get("call")
    try:
        args, kwargs = _decode(request.get("args")), _decode(request.get("kwargs"))
        function = namespace[name] if name in namespace else None
        if function is None:
            raise NameError(f"name {name!r} is not defined")
        value = function(*args, **kwargs)
    except SystemExit as exc:
        return {"exit": f"SystemExit({exc.code!r})", "blocked": blocked}
    except Exception as exc:
        try:
            message = str(exc)[:_REASON_CHARS]
        except Exception:
            message = ""
        return {"raise": [type(exc).__name__, message], "blocked": blocked}
    except BaseException as exc:
        return {"exit": type(exc).__name__, "blocked": blocked}
    try:
        return {"return": _encode(value, [_MAX_ITEMS]), "blocked": blocked}
    except _Tampered as exc:
        return {"tampered": str(exc), "blocked": blocked}
    except (_TooBig, RecursionError, MemoryError) as exc:
        return {"rejected": f"returned a value {exc}", "blocked": blocked}
    except Exception as exc:  # the value's own methods raised while it was read
        return {"rejected": f"returned a value that could not be read ({type(exc).__name__})", "blocked": blocked}


def _describe_names(namespace: dict) -> dict:
    import types

    names = {}
    for name, value in list(namespace.items()):
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            names[name] = ["module", getattr(value, "__name__", name)]
        elif callable(value):
            names[name] = ["function"]
        else:
            try:
                names[name] = ["value", _encode(value, [10_000])]
            except Exception:
                pass
    return names


def _send_and_exit(lines: _Lines | None, message: dict) -> None:
    # Flushed first: once the judge has the message it exits, and the kernel ends this process.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        if lines is not None:
            lines.send(message)
    except BaseException:
        pass
    os._exit(0)


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
_WRITABLE = ("/tmp", "/dev/shm", "/dev/null")


def _install_audit_hook(blocked: list[str]) -> None:
    """The second wall: refuse what the kernel walls also stop, so the reason is named."""
    own_pid = os.getpid()

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return any(real == root or real.startswith(root + os.sep) for root in _WRITABLE)

    def deny(what: str) -> None:
        blocked.append(what)
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
            if writes and not inside(path):
                deny(f"open({path!r}, 'w')")
        elif event in _PATH_EVENTS:
            path_positions, fd_positions = _PATH_EVENTS[event]
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


def _describe_exception(exc: BaseException, filename: str) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        frames = [f for f in _traceback_frames(exc) if f[0] == filename]
        if frames:
            lineno, line = frames[-1][1], frames[-1][2]
            text += f" (line {lineno}: {line})" if line else f" (line {lineno})"
        return text
    except BaseException:  # e.g. MemoryError again while formatting
        return type(exc).__name__


def _traceback_frames(exc: BaseException) -> list[tuple[str, int, str]]:
    import linecache

    frames = []
    tb = exc.__traceback__
    while tb is not None:
        filename, lineno = tb.tb_frame.f_code.co_filename, tb.tb_lineno
        frames.append((filename, lineno, linecache.getline(filename, lineno).strip()))
        tb = tb.tb_next
    return frames


if __name__ == "__main__":
    if sys.argv[1] == "judge":
        _judge_main()
    else:
        _program_main(int(sys.argv[2]), int(sys.argv[3]))
