"""The house's rules, checked from the source: layers point down, no import cycles, no Streamlit in core.

The graph is built from every ``import`` statement in ``core/`` (read with ``ast``, nothing
is imported). A module may import modules of its own package and of the packages below
it; the command line (``core/cli/``), ``tasks.py``, ``demo.py`` and ``bench.py`` sit on top.
The project's own modules are imported at module top, so the graph seen here is the real
one; only heavy third-party libraries (torch and friends) may be imported inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core"

# Each package, and the packages it may import (besides itself). The order is the floors.
ALLOWED = {
    "base": set(),
    "inputs": {"base"},
    "projects": {"base", "inputs"},
    "vision": {"base", "inputs"},
    "learning": {"base", "inputs", "projects", "vision"},
    "tagging": {"base", "inputs", "projects", "vision", "learning"},
    "present": {"base", "inputs", "projects", "vision", "learning", "tagging"},
}
TOP = "top"  # modules directly in core/: the command line and the background jobs


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else TOP


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported core module, at module level?) for every import of core in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under "if TYPE_CHECKING:" count as module level
        if isinstance(node, ast.If):
            top_level |= {id(child) for child in node.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "core":
                names = [f"core.{alias.name}" for alias in node.names]
            else:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "core" or name.startswith("core."):
                found.append((name, id(node) in top_level))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        graph[module] = {name for name, _ in _imports(path) if name in files and name != module}
    return graph


def test_core_never_imports_streamlit():
    offenders = [str(p.relative_to(CORE.parent)) for p in CORE.rglob("*.py")
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "streamlit" in ast.dump(n)
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []


def test_the_projects_own_modules_are_imported_at_module_top():
    inside = [f"{p.relative_to(CORE.parent)} imports {name} inside a function"
              for p in CORE.rglob("*.py") for name, at_top in _imports(p) if not at_top]
    assert inside == []


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for module, targets in _graph().items():
        package = _package(module)
        for target in targets:
            other = _package(target)
            if package == TOP or other == package:
                continue
            if other == TOP or other not in ALLOWED[package]:
                wrong.append(f"{module} ({package}) imports {target} ({other})")
    assert wrong == []


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_package_says_what_floor_it_is(package):
    doc = ast.get_docstring(ast.parse((CORE / package / "__init__.py").read_text()))
    assert doc and doc.startswith("Floor")


def test_no_module_is_a_thousand_lines_again():
    """Modules keep one job each: ~500 lines is the house's limit (a little slack for docstrings)."""
    long = {str(p.relative_to(CORE.parent)): n for p in CORE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 520}
    assert long == {}
