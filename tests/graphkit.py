"""The import graph of a package, read from the source (AST), never by importing it.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (a function-local
import is still an arrow of the design), relative ones resolved against the importing module's package.
An arrow goes to the module named: ``from sslbench.data import layouts`` is an arrow to
``sslbench.data.layouts`` (a module), ``from sslbench.data.layouts import ct`` to ``sslbench.data.layouts.ct``,
``from sslbench.errors import DataError`` to ``sslbench.errors`` (a name inside a module). The implicit
import of a package's ``__init__`` on the way to one of its modules is not an arrow: a layout reader that
imports ``sslbench.data.layouts.base`` does not depend on the table in ``sslbench/data/layouts/__init__.py``.

Rules are data (:class:`Layer`, the prefixes of :func:`cycles`), so that a layer made one-way later is one more
entry in a table of ``tests/test_layers.py``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


def within(module: str, prefix: str) -> bool:
    """``module`` is ``prefix`` or one of its submodules (``sslbench.data.x`` is within ``sslbench.data``)."""
    return module == prefix or module.startswith(prefix + ".")


def modules(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} of every ``.py`` file of the package folder (a package is its ``__init__``)."""
    package_dir = Path(package_dir)
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _imported(node: ast.AST, module: str, files: dict[str, Path]) -> list[str]:
    """The modules of ``files`` one import statement names (nearest enclosing module of each name)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if _is_package(module, files) else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files else origin
                   for alias in node.names]
    else:
        return []
    out = []
    for name in targets:
        while name and name not in files:   # a name inside a module: the module that holds it
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_edges(package_dir: Path) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports}, for every module of the package folder."""
    files = modules(package_dir)
    edges: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        found: set[str] = set()
        for node in ast.walk(tree):   # module level and inside functions alike
            found.update(_imported(node, module, files))
        found.discard(module)
        edges[module] = found
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as its strongly connected component (sorted names; Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def path_in(edges: dict[str, set[str]], component: list[str], start: str | None = None) -> list[str]:
    """The shortest closed path through ``start`` (default: the component's first module) inside a cycle's
    component (``a -> b -> a``), to print what to cut."""
    members, start = set(component), start or component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if w in members and w not in parent and w != start:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


@dataclass(frozen=True)
class Layer:
    """A one-way rule: modules within ``modules`` import, of the package, only modules within ``may_import``
    (their own layer included only where it is listed)."""

    name: str
    modules: str
    may_import: tuple[str, ...]
    exactly: tuple[str, ...] = ()   # modules allowed by name only, not their submodules (the root package)

    def violations(self, edges: dict[str, set[str]]) -> list[str]:
        """``importer -> imported`` for every arrow of the layer that leaves what it may import."""
        return [f"{src} -> {dst}" for src in sorted(edges) if within(src, self.modules)
                for dst in sorted(edges[src])
                if dst not in self.exactly and not any(within(dst, p) for p in self.may_import)]
