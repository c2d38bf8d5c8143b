"""The two processes inside a sample's sandbox: the judge (pid 1) and the program.

This file is mounted read-only at /qsteer/harness.py in every sandbox and run by the sandbox's
interpreter, so it imports only the standard library and never the qsteer package.

    python -I -S -B /qsteer/harness.py judge        (pid 1; its job arrives on stdin)
    python -I -B /qsteer/harness.py program R W     (started by the judge; talks on fds R and W)

The judge is trusted code: it holds the test and the verdict pipe, makes itself non-dumpable so
that the program (the same uid) cannot ptrace it or open its /proc files, runs the test, and
forwards each call of the test's `candidate` to the program as plain data. The program runs
the solution's text alone and answers those calls. Why this split: docs/sandbox.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys

SOLUTION_NAME = "/qsteer/solution.py"  # names for tracebacks; neither is a file the program can see
TEST_NAME = "/qsteer/test.py"
_REASON_CHARS = 500
_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_MAX_DEPTH = 100
_MAX_ITEMS = 1_000_000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_AF_UNIX = 1


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
    if hasattr(kind, "__next__") and hasattr(kind, "__iter__"):
        # A generator, map or zip: its items, read here, arrive as an iterator over them (so
        # `list(candidate(x))` works and `candidate(x) == [...]` stays False, as in one interpreter).
        return ["iterator", [_encode(item, budget, depth + 1) for item in value]]
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
    if tag == "iterator":
        return iter([_decode(item, depth + 1) for item in rest[0]])
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
        [sys.executable, "-I", "-B", os.path.abspath(__file__), "program", str(to_program_r), str(from_program_w)],
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
    def __init__(self, lines: _Lines, program: object) -> None:
        self.lines, self.program = lines, program
        self.failure: _Verdict | None = None  # the first, kept even if the test swallows it
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
            return self._call(name, args, kwargs)
        except _Verdict as verdict:
            self.failure = self.failure or verdict
            raise

    def _call(self, name: str, args: tuple, kwargs: dict) -> object:
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
            raise _Verdict(f"tampered: {name} {reply['tampered']}", tampered=True)
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
    if channel.failure is not None:
        return False, channel.failure.reason, channel.failure.tampered
    if channel.blocked:
        return False, _blocked_reason(channel.blocked), False
    return passed, reason, False


def _names_used(code: object) -> set[str]:
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
    # A judged solution is imported, as HumanEval's harness does: its `if __name__ == "__main__"`
    # demo does not run. A plain program is a script.
    name = "__main__" if mode == "program" else "solution"
    module = types.ModuleType(name)
    module.__file__ = SOLUTION_NAME
    sys.modules[name] = module  # pickle, dataclasses and friends look the code up here
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
