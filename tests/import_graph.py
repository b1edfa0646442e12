"""Test tooling: the import graph of a package, read with ``ast`` (nothing is imported or executed).

Every ``import``/``from ... import`` counts, wherever it stands (module level, inside functions, under
``if TYPE_CHECKING``): a lazy import is still a dependency. Modules are grouped into *units*, the
package's top-level subpackages and modules (``l2zo.optim``, ``l2zo.config``, ...); the package's own
``__init__`` is the unit named after the package. Used by tests/test_boundaries.py.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One import statement: ``module`` (dotted, absolute) imports ``target`` at ``file``:``line``.

    ``file`` is relative to the folder that holds the package (``l2zo/utils/logs.py``).
    """

    module: str
    target: str
    file: Path
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line} ({self.module} imports {self.target})"


def module_name(path: Path, package_dir: Path) -> str:
    """Dotted name of ``path`` inside the package rooted at ``package_dir`` (``pkg/a/__init__.py`` -> ``pkg.a``)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``."""
    return {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from`` import names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, module: str, known: set[str]) -> list[Import]:
    """Every import in the file ``path`` (the module ``module``), absolute; ``known``: the package's modules.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module of the package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(Import(module, alias.name, path, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(node, module, is_package)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append(Import(module, sub if sub in known else source, path, node.lineno))
    return sorted(out, key=lambda i: (str(i.file), i.line, i.target))


def unit_of(module: str, package: str) -> str | None:
    """The top-level unit of ``module`` (``pkg.optim.methods.mezo`` -> ``pkg.optim``); None outside ``package``."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    return ".".join(parts[:2])


@dataclass
class ImportGraph:
    """Imports of one package and the unit-level graph they form."""

    package: str
    imports: list[Import]

    @classmethod
    def build(cls, package_dir: Path) -> ImportGraph:
        modules = package_modules(package_dir)
        known = set(modules)
        imports = [replace(imp, file=imp.file.relative_to(package_dir.parent))
                   for mod, path in modules.items() for imp in imports_of(path, mod, known)]  # fmt: skip
        return cls(package_dir.name, imports)

    def edges(self) -> dict[tuple[str, str], list[Import]]:
        """(unit, unit it imports) -> the import statements behind that edge; self-edges left out."""
        out: dict[tuple[str, str], list[Import]] = {}
        for imp in self.imports:
            a, b = unit_of(imp.module, self.package), unit_of(imp.target, self.package)
            if a and b and a != b:
                out.setdefault((a, b), []).append(imp)
        return out

    def cycles(self) -> list[list[str]]:
        """One cycle path per strongly connected group of units, e.g. ``[a, b, a]``; empty when acyclic."""
        edges = self.edges()
        succ: dict[str, list[str]] = {}
        for a, b in sorted(edges):
            succ.setdefault(a, []).append(b)
            succ.setdefault(b, [])
        return [_cycle_through(scc, succ) for scc in _sccs(succ) if len(scc) > 1]

    def describe(self, cycle: list[str]) -> str:
        """A cycle path with, per edge, the first import statement that makes it."""
        edges = self.edges()
        lines = [" -> ".join(cycle)]
        for a, b in itertools.pairwise(cycle):
            lines.append(f"  {a} -> {b}: {edges[(a, b)][0].where()}")
        return "\n".join(lines)

    def imports_outside(self, names: tuple[str, ...], allowed_unit: str) -> list[Import]:
        """Imports of any of the top-level packages ``names`` from modules outside ``allowed_unit``."""
        return [imp for imp in self.imports if imp.target.split(".")[0] in names
                and unit_of(imp.module, self.package) != allowed_unit]  # fmt: skip


def _sccs(succ: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted, in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(out)


def _cycle_through(scc: list[str], succ: dict[str, list[str]]) -> list[str]:
    """The shortest cycle from the first unit of ``scc`` back to itself, within ``scc`` (breadth-first)."""
    start, members = scc[0], set(scc)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in succ[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {scc}")  # unreachable for a real SCC
