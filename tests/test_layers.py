"""The package's layers point one way: an import may only go down (or sideways within a layer) and
never close a circle between parts; Ray is imported only where actors and the orchestrator live.

Every module under qsteer/ is parsed (imports inside functions count too: a lazy import is still
a dependency). A part is a top-level module or package of qsteer (`qsteer.decoding`, `qsteer.cli`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qsteer"

# Lowest first. A part may import parts of its own layer or below it, never above.
LAYERS: list[set[str]] = [
    {"models", "lm", "metrics", "data", "conf"},  # model primitives and leaf utilities
    {"decoding", "values"},  # token loops and value functions, over lm
    {"engines"},  # thin facades over the loops
    {"rewards"},  # beside the engines: a judge reward builds an engine through the factory
    {"training"},  # value training and CTRL through TRL: uses engines and rewards, never imported by inference
    {"actors", "cluster"},  # Ray actors per role, groups, placement
    {"workflows", "search"},  # one module per method, over role groups
    {"config", "results", "progress", "report", "report_page", "run", "cli", "cache", "streaming"},  # the orchestrator
]
RAY_PARTS = {"actors", "cluster", "run", "cli", "streaming"}  # streaming: Ray Data reads dataset=files
# A known upward import or Ray use that another change in flight removes; the test fails once it is
# gone, so the entry cannot outlive it. Key: (importing part, imported part or "ray").
PENDING: dict[tuple[str, str], str] = {}


def layer_of(part: str) -> int:
    for level, parts in enumerate(LAYERS):
        if part in parts:
            return level
    raise AssertionError(f"qsteer.{part} is in no layer: add it to LAYERS in tests/test_layers.py")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            # `from qsteer import workflows` imports the part `workflows`
            if module == "qsteer":
                found += [(f"qsteer.{alias.name}", node.lineno) for alias in node.names]
    return found


def part_of(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[1] if pieces[0] == "qsteer" and len(pieces) > 1 else None


def dependencies() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part or "ray") -> where: ["qsteer/x.py:12", ...]."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of(module_name(path))
        if source is None:  # qsteer/__init__.py
            continue
        for module, line in imports_of(path):
            target = "ray" if module.split(".")[0] == "ray" else part_of(module)
            if target is not None and target != source:
                edges.setdefault((source, target), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges


def violations() -> dict[tuple[str, str], str]:
    found = {}
    for (source, target), where in dependencies().items():
        if target == "ray":
            if source not in RAY_PARTS:
                found[(source, target)] = f"qsteer.{source} imports ray (only {sorted(RAY_PARTS)} may): {where}"
        elif layer_of(target) > layer_of(source):
            found[(source, target)] = f"qsteer.{source} imports the higher layer qsteer.{target}: {where}"
    return found


def test_every_part_has_a_layer():
    for path in PACKAGE.iterdir():
        if path.name.startswith(("_", ".")) or (path.is_dir() and not any(path.glob("*.py")) and path.name != "conf"):
            continue
        layer_of(path.stem if path.suffix == ".py" else path.name)


def test_imports_point_down_and_ray_stays_in_actors():
    found = violations()
    unexpected = [message for key, message in found.items() if key not in PENDING]
    assert not unexpected, "\n".join(unexpected)
    stale = [f"{key}: {why}" for key, why in PENDING.items() if key not in found]
    assert not stale, "these PENDING entries no longer happen; delete them from tests/test_layers.py:\n" + "\n".join(stale)


def test_no_circle_between_parts():
    graph: dict[str, set[str]] = {}
    for source, target in dependencies():
        if target != "ray":
            graph.setdefault(source, set()).add(target)
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circle = path[path.index(nxt):] + [nxt]
                pytest.fail("parts import each other in a circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checks_catch_what_they_claim(tmp_path, monkeypatch):
    """Negative control: an upward import, a lazy one inside a function, a Ray import and a circle are all found."""
    fake = tmp_path / "qsteer"
    (fake / "lm").mkdir(parents=True)
    (fake / "engines").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "lm" / "__init__.py").write_text("def f():\n    from qsteer.engines import build_engine\n")
    (fake / "engines" / "__init__.py").write_text("import ray\nfrom ..lm import f\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    found = violations()
    assert ("lm", "engines") in found and "qsteer/lm/__init__.py:2" in found[("lm", "engines")]
    assert ("engines", "ray") in found
    assert ("engines", "lm") in dependencies()  # the relative import resolves
    with pytest.raises(pytest.fail.Exception, match="circle"):
        test_no_circle_between_parts()
