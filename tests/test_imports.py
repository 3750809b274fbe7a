"""Imports in crealia/ flow one way: no module imports, even only for type checking or inside a
function, a module that imports it back. And the Python client, with the protocol table it
reads, stays clear of the server's modules.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` anywhere in a module, ``if TYPE_CHECKING:`` blocks included, relative ones
resolved against the module's package. ``from . import _wire`` is an edge to ``crealia._wire``,
not to the package.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "crealia"

#: Modules only a server runs; the client (and what it imports) must need none of them.
_SERVER_ONLY = (
    "_session", "_room", "_settle", "_storage", "_server", "_backplane", "_http", "_monitor",
    "_auth", "_config", "_ratelimit", "backplanes", "transports",
)  # fmt: skip


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module of the package at ``root`` and the package's modules it imports."""
    mods = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                # A name imported from a package may be a submodule (from . import _wire).
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [module, *subs]
            for target in targets:
                # ``import a.b.c`` also imports a and a.b: the nearest module of the package.
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.add(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: Mapping[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``group`` (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def closure(graph: Mapping[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or not."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_imports_have_no_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and graph["crealia._session"] >= {"crealia._wire", "crealia._room"}
    found = [" -> ".join(cycle) for cycle in cycles(graph)]
    assert not found, "import cycles in crealia/:\n" + "\n".join(found)


def test_client_and_protocol_table_import_no_server_module() -> None:
    graph = import_graph(PACKAGE)
    assert graph["crealia._protocol"] <= {"crealia._wire", "crealia._model", "crealia._errors"}
    assert "crealia._protocol" in graph["crealia._client"]
    server = {m for m in graph if "." in m and m.split(".")[1].startswith(_SERVER_ONLY)}
    assert "crealia._session" in server and "crealia.backplanes.redis" in server
    assert closure(graph, "crealia._client") & server == set()


# -- the walker finds what it must ------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_import_graph_counts_type_checking_relative_and_late_imports(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "_a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._b import B\n",
        "_b.py": "from . import _c\n",
        "_c.py": "def f():\n    from pkg._a import A\n",
        "sub/__init__.py": "",
        "sub/_d.py": "from .. import _c, _e\nimport pkg.sub\n",
        "_e.py": "import os\nfrom .sub import _d\n",
    })  # fmt: skip
    graph = import_graph(root)
    assert graph == {
        "pkg": set(),
        "pkg._a": {"pkg._b"},
        "pkg._b": {"pkg._c"},
        "pkg._c": {"pkg._a"},
        "pkg.sub": set(),
        "pkg.sub._d": {"pkg._c", "pkg._e", "pkg.sub"},
        "pkg._e": {"pkg.sub._d"},
    }
    assert sorted(cycles(graph)) == [
        ["pkg._a", "pkg._b", "pkg._c", "pkg._a"],
        ["pkg._e", "pkg.sub._d", "pkg._e"],
    ]


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("from . import _b\n", "pkg._b"),
        ("from .. import _b\n", "pkg._b"),
        ("from ._b import name\n", "pkg._b"),
        ("from pkg import name\n", "pkg"),
        ("import pkg._b\n", "pkg._b"),
    ],
)
def test_import_graph_resolves_each_form(tmp_path: Path, text: str, target: str) -> None:
    inner = text.startswith("from ..")
    root = _package(tmp_path, {"_b.py": "", "sub/__init__.py": "",
                               ("sub/_a.py" if inner else "_a.py"): text})  # fmt: skip
    source = "pkg.sub._a" if inner else "pkg._a"
    assert import_graph(root)[source] == {target}
