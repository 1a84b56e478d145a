"""Imports run one way: training -> adapters_registry <- gateway, and loragate (the umbrella CLI) may import all three.

Every module of the four packages is read with `ast`, so an import inside a function or under `if TYPE_CHECKING:`
counts like one at the top, for the direction and for cycles: no chain of imports leads back to the module it
started from (a type-only import still says "this module needs that one", as registry.py <-> gc.py did).
`importlib.import_module(name)` in loragate/cli.py is not read: loragate is the top.
"""

from __future__ import annotations

import ast
import graphlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAY_IMPORT = {
    "adapters_registry": set(),
    "gateway": {"adapters_registry"},
    "training": {"adapters_registry"},
    "loragate": {"adapters_registry", "gateway", "training"},
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module: the longest module or package name of ours that the statement names
    where: str  # path:line
    type_only: bool  # under `if TYPE_CHECKING:`


def module_names(root: Path, packages: list[str]) -> dict[str, Path]:
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


class _Reader(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, known: set[str]) -> None:
        self.module = module
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.where = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        self.known = known
        self.type_only = False
        self.found: list[Import] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            outer, self.type_only = self.type_only, True
            for child in node.body:
                self.visit(child)
            self.type_only = outer
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: `from . import x`, `from ..y import z`
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        for alias in node.names:  # `from gateway import cli` imports the module gateway.cli
            self._add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.known else base, node.lineno)

    def _add(self, name: str, line: int) -> None:
        while name and name not in self.known:
            name = name.rpartition(".")[0]
        if name:
            self.found.append(Import(self.module, name, f"{self.where}:{line}", self.type_only))


def read_imports(modules: dict[str, Path]) -> Iterator[Import]:
    for module, path in modules.items():
        reader = _Reader(module, path, set(modules))
        reader.visit(ast.parse(path.read_text(), str(path)))
        yield from reader.found


def wrong_direction(imports: list[Import]) -> list[str]:
    return sorted(
        {
            f"{i.where}: {i.source} imports {i.target}{' (under TYPE_CHECKING)' if i.type_only else ''}"
            for i in imports
            if (top := i.source.split(".")[0]) != (other := i.target.split(".")[0]) and other not in MAY_IMPORT[top]
        }
    )


def cycles(imports: list[Import]) -> list[str]:
    """Every cycle among the modules, one line each (`a -> b (where) -> a (where)`), from its smallest name."""
    edges: dict[tuple[str, str], str] = {}
    for i in imports:
        if i.source != i.target:
            edges.setdefault((i.source, i.target), i.where)
    imported_by: dict[str, set[str]] = {}  # graphlib wants each node's predecessors: the modules it imports
    for source, target in edges:
        imported_by.setdefault(source, set()).add(target)
    found = []
    while True:
        try:
            graphlib.TopologicalSorter(imported_by).prepare()
        except graphlib.CycleError as exc:
            ring: list[str] = exc.args[1][:0:-1]  # [a, b, ...]: each imports the next, the last imports a
            start = ring.index(min(ring))
            loop = [*ring[start:], *ring[:start], ring[start]]
            found.append(loop[0] + "".join(f" -> {b} ({edges[a, b]})" for a, b in itertools.pairwise(loop)))
            imported_by[loop[0]].discard(loop[1])  # break it there and look for the next one
        else:
            return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return list(read_imports(module_names(ROOT, sorted(MAY_IMPORT))))


def test_imports_run_one_way(imports: list[Import]) -> None:
    assert {i.source.split(".")[0] for i in imports} == set(MAY_IMPORT)  # every package was read
    assert wrong_direction(imports) == []


def test_no_import_cycles(imports: list[Import]) -> None:
    assert cycles(imports) == []


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "training" / "sft.py").write_text("from training import cli\nimport gateway.app\n")
    (tmp_path / "training" / "cli.py").write_text(
        "from typing import TYPE_CHECKING\nimport torch\n"
        "if TYPE_CHECKING:\n    from loragate.cli import main\n"
        "def handle():\n    from . import sft\n    from .sft import run\n"
    )
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "__init__.py").write_text("")
    (tmp_path / "gateway" / "app.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import training.sft\n")
    (tmp_path / "loragate").mkdir()
    (tmp_path / "loragate" / "cli.py").write_text("")
    found = list(read_imports(module_names(tmp_path, ["training", "gateway", "loragate"])))
    seen = {(i.source, i.target, i.where.rpartition(":")[2], i.type_only) for i in found}
    assert seen == {
        ("training.sft", "training.cli", "1", False),
        ("training.sft", "gateway.app", "2", False),
        ("training.cli", "loragate.cli", "4", True),
        ("training.cli", "training.sft", "6", False),
        ("training.cli", "training.sft", "7", False),
        ("gateway.app", "training.sft", "3", True),
    }
    assert wrong_direction(found) == [
        f"{tmp_path}/gateway/app.py:3: gateway.app imports training.sft (under TYPE_CHECKING)",
        f"{tmp_path}/training/cli.py:4: training.cli imports loragate.cli (under TYPE_CHECKING)",
        f"{tmp_path}/training/sft.py:2: training.sft imports gateway.app",
    ]
    assert sorted(cycles(found)) == [
        f"gateway.app -> training.sft ({tmp_path}/gateway/app.py:3) -> gateway.app ({tmp_path}/training/sft.py:2)",
        f"training.cli -> training.sft ({tmp_path}/training/cli.py:6) -> training.cli ({tmp_path}/training/sft.py:1)",
    ]
