"""Package boundaries, checked on the source with ``ast`` (no l2zo module is imported here).

- No import cycle between l2zo's top-level subpackages and modules (optim, learned, engine, train, ...).
- Lightning (``lightning``, ``pytorch_lightning``) is imported only under ``l2zo/train/``.

Imports inside functions and under ``TYPE_CHECKING`` count: a lazy import is still a dependency.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

from tests.import_graph import ImportGraph

L2ZO = Path(__file__).resolve().parents[1] / "l2zo"
LIGHTNING = ("lightning", "pytorch_lightning")
UNITS = {"l2zo.optim", "l2zo.learned", "l2zo.engine", "l2zo.train", "l2zo.compare", "l2zo.cli", "l2zo.tasks",
         "l2zo.models", "l2zo.bench", "l2zo.utils", "l2zo.synthetic", "l2zo.config", "l2zo.errors"}  # fmt: skip


def cycle_report(graph: ImportGraph) -> str:
    return "\n".join(graph.describe(c) for c in graph.cycles())


def stray_report(graph: ImportGraph, allowed_unit: str) -> str:
    return "\n".join(i.where() for i in graph.imports_outside(LIGHTNING, allowed_unit))


# -- the rules, on l2zo -----------------------------------------------------------------------------------


def test_the_checker_sees_every_l2zo_package():
    graph = ImportGraph.build(L2ZO)
    units = {u for edge in graph.edges() for u in edge}
    assert UNITS <= units, f"packages with no import edge at all (did parsing miss them?): {UNITS - units}"


def test_no_import_cycle_between_l2zo_packages():
    graph = ImportGraph.build(L2ZO)
    cycles = graph.cycles()
    assert not cycles, "import cycle between l2zo packages (move the shared piece into the lower package):\n" + (
        cycle_report(graph)
    )


def test_lightning_is_imported_only_under_train():
    graph = ImportGraph.build(L2ZO)
    strays = stray_report(graph, "l2zo.train")
    assert not strays, f"Lightning imported outside l2zo/train/ (keep it there):\n{strays}"


# -- the checker itself, on a small package written here --------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))
    return root / "pkg"


ACYCLIC = {
    "__init__.py": "",
    "config.py": "from pkg.errors import Oops\n",
    "errors.py": "class Oops(Exception): ...\n",
    "low/__init__.py": "",
    "low/x.py": "import os\nfrom pkg import config\n",
    "high/__init__.py": "from .y import f\n",
    "high/y.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkg.low.x import os
        def f():
            from ..low import x
            return x
    """,
    "train/__init__.py": "import lightning\nfrom pytorch_lightning import Trainer\n",
}


def test_checker_resolves_absolute_relative_and_lazy_imports(tmp_path):
    graph = ImportGraph.build(write_package(tmp_path, ACYCLIC))
    assert set(graph.edges()) == {("pkg.config", "pkg.errors"), ("pkg.low", "pkg.config"), ("pkg.high", "pkg.low")}
    lazy = [i for i in graph.edges()[("pkg.high", "pkg.low")] if i.line == 6]
    assert lazy and lazy[0].target == "pkg.low.x"  # `from ..low import x` inside a function: the module pkg.low.x
    assert graph.cycles() == []
    assert stray_report(graph, "pkg.train") == ""  # Lightning where it belongs


def test_checker_reports_a_cycle_with_its_path(tmp_path):
    files = {**ACYCLIC, "low/z.py": "def g():\n    import pkg.high.y\n"}  # a lazy import upwards closes a cycle
    graph = ImportGraph.build(write_package(tmp_path, files))
    assert graph.cycles() == [["pkg.high", "pkg.low", "pkg.high"]]
    report = cycle_report(graph)
    assert report.splitlines()[0] == "pkg.high -> pkg.low -> pkg.high"
    assert "pkg/low/z.py:2 (pkg.low.z imports pkg.high.y)" in report


def test_checker_reports_a_longer_cycle_through_a_top_level_module(tmp_path):
    files = {**ACYCLIC, "errors.py": "from pkg.high import f\n"}  # errors -> high -> low -> config -> errors
    graph = ImportGraph.build(write_package(tmp_path, files))
    assert graph.cycles() == [["pkg.config", "pkg.errors", "pkg.high", "pkg.low", "pkg.config"]]


def test_checker_catches_a_stray_lightning_import(tmp_path):
    files = {**ACYCLIC, "low/log.py": "def quiet():\n    import lightning.pytorch as pl\n    return pl\n",
             "high/z.py": "from pytorch_lightning.callbacks import Callback\n"}  # fmt: skip
    graph = ImportGraph.build(write_package(tmp_path, files))
    strays = stray_report(graph, "pkg.train").splitlines()
    assert strays == ["pkg/high/z.py:1 (pkg.high.z imports pytorch_lightning.callbacks)",
                      "pkg/low/log.py:2 (pkg.low.log imports lightning.pytorch)"]  # fmt: skip
