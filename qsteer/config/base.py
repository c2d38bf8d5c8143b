"""What every typed config node shares: checked fields, the resource marker and the field docs.

A config node is a frozen dataclass. Its field annotations are the schema (`Literal` for choices,
`Annotated[int, Range(1)]` for ranges) and are checked whenever the node is built, from YAML or
in code; the string literal under a field is its documentation (PEP 257 attribute docstrings),
read back by `field_docs` for `qsteer --help` and the README. `build` turns a composed (plain
dict) node into its dataclass, refusing unknown and unset keys and naming the full key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field
from functools import cache
from typing import Annotated, Any, Literal, Union

UNSET = "???"  # OmegaConf's mark for a value the command must give


class ConfigError(ValueError):
    """A config value is wrong; the message names the full key (`workflow.n must be ...`)."""


class Invalid(ValueError):
    """A wrong field of one node; `key` is relative to that node, the converter prefixes its path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message

    def nested(self, parent: str) -> Invalid:
        return Invalid(join(parent, self.key), self.message)

    def render(self, path: str = "") -> str:
        key = join(path, self.key)
        text = self.message.replace("{key}", key)
        return f"{key}{text}" if text.startswith("=") else f"{key} {text}"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


@dataclass(frozen=True)
class Range:
    """A number's bounds, for `Annotated[int, Range(1)]`: `low <= value` (`<` if low_open), `value <= high`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class NonEmpty:
    """A string that is not empty, for `Annotated[str, NonEmpty()]`."""

    def holds(self, value: str) -> bool:
        return bool(value)

    def describe(self) -> str:
        return "non-empty"


RESOURCE = "resource"


def resource(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A field that changes where or how fast a run goes, never what it writes: resuming a run
    folder with another value is allowed (`qsteer.results.config_changes`)."""
    return field(default=default, default_factory=default_factory, metadata={RESOURCE: True})


@dataclass(frozen=True)
class Config:
    """Base of the config nodes: checks and normalises each field when built, then `check()`."""

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        self.check()

    def check(self) -> None:
        """Rules between fields; raise `Invalid(field, message)`."""


# -- types: checking, converting, describing ---------------------------------------------------------


@cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _split(tp: Any) -> tuple[Any, tuple]:
    """(bare type, constraints) of `Annotated[T, c...]` or of a plain type."""
    if typing.get_origin(tp) is Annotated:
        bare, *meta = typing.get_args(tp)
        return bare, tuple(meta)
    return tp, ()


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against `tp` (lists become tuples, dicts become nested configs), or Invalid."""
    if isinstance(value, str) and value == UNSET:
        raise Invalid(key, "is required but not set (add `{key}=...` to the command)")
    bare, constraints = _split(tp)
    if _is_union(bare):
        for option in typing.get_args(bare):
            try:
                return coerce(value, option, key)
            except Invalid as err:
                if err.key != key:  # a nested key of a matching shape: its own message is clearer
                    raise
        raise _wrong(value, tp, key)
    out = _coerce_bare(value, bare, key)
    if any(not c.holds(out) for c in constraints):
        raise _wrong(value, tp, key)
    return out


def _coerce_bare(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        if all(isinstance(a, str) for a in args):
            raise Invalid(key, f"={value!r} is not one of: {', '.join(args)}")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) == len(args):
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            value_type = args[1] if args else Any
            return {k: coerce(v, value_type, join(key, str(k))) for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            try:
                return build(tp, value)
            except Invalid as err:
                raise err.nested(key) from None
    raise _wrong(value, tp, key)


def _wrong(value: Any, tp: Any, key: str) -> Invalid:
    return Invalid(key, f"must be {describe(tp)}, got {value!r}")


def describe(tp: Any) -> str:
    """A type in words, for error messages: "an integer >= 1", "a number in [0, 1024] or `auto`"."""
    bare, constraints = _split(tp)
    extra = "".join(f" {c.describe()}" for c in constraints if not isinstance(c, NonEmpty))
    origin, args = typing.get_origin(bare), typing.get_args(bare)
    if _is_union(bare):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return f"`{_show(args[0])}`" if len(args) == 1 else "one of: " + ", ".join(_show(a) for a in args)
    if origin is tuple:
        return f"a list, each {describe(args[0])}" if args[-1] is Ellipsis else f"a list of {len(args)} items"
    words = {int: "an integer", float: "a number", bool: "true or false", type(None): "null", Any: "any value",
             str: "a non-empty string" if any(isinstance(c, NonEmpty) for c in constraints) else "a string"}
    if bare in words:
        return words[bare] + extra
    if origin is dict or bare is dict:
        return "a mapping"
    return f"a {bare.__name__} mapping"


def type_name(tp: Any) -> str:
    """A type in short, for `--help` and the README: `int >= 1`, `'hf' | 'vllm'`, `list[str]`."""
    bare, constraints = _split(tp)
    extra = "".join(f" {c.describe()}" for c in constraints)
    origin, args = typing.get_origin(bare), typing.get_args(bare)
    if _is_union(bare):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(_show(a) for a in args)
    if origin is tuple:
        return f"list[{type_name(args[0])}]" if args[-1] is Ellipsis else f"[{', '.join(map(type_name, args))}]"
    if origin is dict or bare is dict:
        return "dict"
    if bare is type(None):
        return "null"
    if bare is Any:
        return "any"
    return f"{getattr(bare, '__name__', str(bare))}{extra}"


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


# -- building nodes from composed configs ------------------------------------------------------------


def build(cls: type, node: dict[str, Any], label: str | None = None) -> Any:
    """`cls` built from a composed node: unknown or unset keys and wrong values raise Invalid
    with the key relative to the node. `label` names the node in the unknown-key message."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in node if k not in names]
    if unknown:
        where = f" of {label}" if label else ""
        raise Invalid(str(unknown[0]), f"is not a key{where}; its keys are: {', '.join(names)}")
    hints = type_hints(cls)
    values = {k: coerce(v, hints[k], k) for k, v in node.items()}
    try:
        return cls(**values)
    except Invalid:
        raise
    except (TypeError, ValueError) as err:  # a config class of a lower layer checks in its own words
        raise ConfigError(str(err)) from err


def build_checked(cls: type, node: dict[str, Any], path: str, label: str | None = None) -> Any:
    """`build`, with errors as ConfigError naming the full key under `path`."""
    try:
        return build(cls, node, label)
    except Invalid as err:
        raise ConfigError(err.render(path)) from None


def defaults(cls: type) -> dict[str, Any]:
    """Each field's default, nested configs as dicts (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def plain(value: Any) -> Any:
    """A config value as YAML would hold it: configs as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def is_resource(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(RESOURCE))


# -- documentation: attribute docstrings --------------------------------------------------------------


@cache
def _own_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring; a subclass's doc for a field it redeclares wins."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_own_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def class_doc(cls: type) -> str:
    """The class's own docstring (not the signature dataclasses put there when it has none)."""
    doc = vars(cls).get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)
