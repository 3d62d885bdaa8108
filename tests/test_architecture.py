"""The package's layout rules (written in ``transformers_fastpath/__init__.py`` and docs/architecture.md),
checked on the source: no import circles between modules or between folders, planning imports
neither torch nor transformers at module import, passes never reach interception, the CLI or the
bench, and only ``interception/`` replaces transformers' functions.

Every import counts, at module level or inside a function (a function-level import hides a
circle from Python, not from a reader); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = "transformers_fastpath"
SOURCE = REPO / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in SOURCE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Absolute names a statement imports (a module, or a name inside a module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    for alias in node.names:
        yield f"{base}.{alias.name}"


def imports(module: str, *, module_level_only: bool = False) -> set[str]:
    """What ``module`` imports: package modules by name, other libraries by their top-level name."""
    tree = ast.parse(MODULES[module].read_text())
    skip = _type_checking_nodes(tree)
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
            continue
        for target in _targets(module, node):
            if target.startswith(PACKAGE + ".") or target == PACKAGE:
                while target and target not in MODULES:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.add(target)
            else:
                found.add(target.split(".")[0])
    return found


def folder(module: str) -> str:
    """``planning`` for ``transformers_fastpath.planning.policy.schema``; top-level modules name themselves."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one node (each one an import circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


MODULE_GRAPH = {m: {t for t in imports(m) if t in MODULES} for m in MODULES}


def test_no_import_circle_between_modules() -> None:
    circles = strongly_connected(MODULE_GRAPH)
    assert not circles, ("modules that import each other (directly or around a circle); move the shared piece "
                         f"into a module both can import: {circles}")


def test_no_import_circle_between_folders() -> None:
    folders: dict[str, set[str]] = {}
    for module, targets in MODULE_GRAPH.items():
        for target in targets:
            if folder(target) != folder(module):
                folders.setdefault(folder(module), set()).add(folder(target))
    circles = strongly_connected(folders)
    assert not circles, f"folders that import each other: {circles}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if folder(m) == "planning"))
def test_planning_imports_neither_torch_nor_transformers_at_module_import(module: str) -> None:
    heavy = imports(module, module_level_only=True) & {"torch", "transformers", "accelerate", "numpy"}
    assert not heavy, f"{module} imports {sorted(heavy)} at module import; import it inside the function that needs it"


def test_planning_module_import_stays_light() -> None:
    """The same, at run time: importing every planning module loads no torch or transformers."""
    from conftest import run_python

    modules = sorted(m for m in MODULES if folder(m) == "planning")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = run_python(code, env={"TRANSFORMERS_FASTPATH": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("module", sorted(m for m in MODULES if folder(m) == "planning"))
def test_planning_depends_only_on_the_plugin_core(module: str) -> None:
    outside = {folder(t) for t in imports(module) if t in MODULES and folder(t) != "planning"}
    assert outside <= {"errors", "plugins", "hookspecs"}, f"{module} imports from {sorted(outside)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if folder(m) == "passes"))
def test_passes_never_import_interception_cli_or_bench(module: str) -> None:
    bad = {t for t in imports(module) if t in MODULES and folder(t) in ("interception", "cli", "bench", "doctor")}
    assert not bad, f"{module} imports {sorted(bad)}: passes act on a model, whoever loaded it"


def test_only_interception_replaces_transformers_functions() -> None:
    """Replacing transformers' functions (``setattr`` on a transformers module or class, or an
    assignment to one of their attributes) happens in ``interception/`` only."""
    offenders = []
    for module, path in MODULES.items():
        if folder(module) == "interception":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
                targets = [ast.Attribute(value=node.args[0], attr="?")]
            for target in targets:
                if isinstance(target, ast.Attribute) and _names_transformers(target.value):
                    offenders.append(f"{module}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not offenders, offenders


def _names_transformers(node: ast.AST) -> bool:
    """``transformers``, ``transformers.x``, ``PreTrainedModel`` / ``Pipeline`` (classes of transformers)."""
    text = ast.unparse(node)
    return text == "transformers" or text.startswith("transformers.") or text in ("PreTrainedModel", "Pipeline")
