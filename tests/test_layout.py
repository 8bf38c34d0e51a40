"""The layout docs/internals.md promises: one owner per concept, no import cycles, no
reaching into another module's private attributes, modules of a readable size."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERNALS = (ROOT / "docs" / "internals.md").read_text()
# One concept each, longer than the bound; docs/internals.md says why.
LONG_MODULES = {"_spool.py", "_writer.py", "_reservations.py"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in (
        ("tokenledger", "tokenledger"),
        ("integrations", "tokenledger.integrations"),
    ):
        for path in (ROOT / folder).rglob("*.py"):
            parts = [
                p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"
            ]
            found[".".join([package, *parts])] = path
    return found


def _runtime_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, at module level or in a function, leaving
    out imports under ``if TYPE_CHECKING:`` (types only)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name in modules)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if not node.module or node.level:
                return
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                target = sub if sub in modules else node.module
                if target in modules:
                    found.add(target)

    Visitor().visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def test_no_two_modules_import_each_other() -> None:
    modules = _modules()
    graph = {name: _runtime_imports(name, path, modules) for name, path in modules.items()}
    mutual = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph[b]})
    assert [] == mutual


def test_no_module_reaches_into_the_ledgers_private_attributes() -> None:
    pattern = re.compile(r"\bledger\._[a-z]|\._ledger\._")
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _modules().values()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert [] == hits


def test_modules_stay_under_600_lines_unless_internals_says_why() -> None:
    long = sorted(
        path.name
        for path in _modules().values()
        if len(path.read_text().splitlines()) > MAX_LINES and path.name not in LONG_MODULES
    )
    assert [] == long
    for name in LONG_MODULES:
        assert f"`{name}`" in INTERNALS


def test_internals_names_every_module_of_the_package() -> None:
    missing = sorted(
        path.name
        for name, path in _modules().items()
        if name.startswith("tokenledger.")
        and not name.startswith(("tokenledger.cli.", "tokenledger.integrations."))
        and path.name not in ("__init__.py", "_version.py")
        and path.name not in INTERNALS
    )
    assert [] == missing


def test_every_test_the_docs_name_exists() -> None:
    """docs/*.md prove each guarantee by naming its test; a renamed or deleted test
    must not leave a guarantee pointing at nothing."""
    defined = {
        match.group(1)
        for path in (ROOT / "tests").rglob("test_*.py")
        for match in re.finditer(r"^(?:async )?def (test_\w+)\(", path.read_text(), re.M)
    }
    named = {
        match.group(1)
        for path in (ROOT / "docs").glob("*.md")
        for match in re.finditer(r"::(test_\w+)", path.read_text())
    }
    assert set() == named - defined
