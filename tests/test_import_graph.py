"""The package's import graph: no circle among module-level imports, ``ops`` pure torch, the core free of the demo kit,
no module on a deprecated old path.

Read from the source with ``ast`` (no import is executed), so a new edge fails here before it can bite at run time.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from hf_lowrank._moved import MOVED, new_name

ROOT = Path(__file__).resolve().parents[1] / "hf_lowrank"
PACKAGE = ROOT.name
#: the demo kit: offline model loaders, bundled data, evaluation helpers and plots
DEMO = f"{PACKAGE}.demo"
#: modules allowed to use the demo kit: the kit itself and the command line
DEMO_USERS = {DEMO, f"{PACKAGE}.cli"}
STDLIB = set(sys.stdlib_module_names)
#: the error classes: a leaf (standard library only) that every layer, ops included, may import
ERRORS = f"{PACKAGE}.errors"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(path: Path, module: str, is_package: bool, modules, *, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports (package-internal ones resolved to the most specific module that exists)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    found.discard(module)
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, pkg, modules, top_level_only=top_level_only) for m, (p, pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_module_level_imports():
    assert _cycles(_graph(top_level_only=True)) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_ops_imports_torch_and_the_standard_library_only():
    for module, imports in _graph(top_level_only=False).items():
        if not module.startswith(f"{PACKAGE}.ops"):
            continue
        foreign = sorted(i for i in imports if i.split(".")[0] not in STDLIB | {"torch"}
                         and not i.startswith(f"{PACKAGE}.ops") and i != ERRORS)
        assert not foreign, f"{module} imports {foreign}: hf_lowrank.ops is pure torch"


def test_errors_is_a_leaf_that_imports_the_standard_library_only():
    # ops may raise the package's errors because errors.py imports nothing else
    imports = _graph(top_level_only=False)[ERRORS]
    assert all(i.split(".")[0] in STDLIB for i in imports), imports


def test_the_core_does_not_import_the_demo_kit():
    for module, imports in _graph(top_level_only=False).items():
        if any(module == user or module.startswith(user + ".") for user in DEMO_USERS):
            continue
        used = sorted(i for i in imports if i == DEMO or i.startswith(DEMO + "."))
        assert not used, f"{module} imports the demo kit {used}: move what it needs into the core"


def test_the_pipeline_imports_the_package_at_module_level_only():
    # no circle needs a function-local import in the pipeline: every package module it uses is a module-level edge
    path = ROOT / "compression" / "pipeline.py"
    local = _graph(top_level_only=False)[f"{PACKAGE}.compression.pipeline"] - _graph(top_level_only=True)[
        f"{PACKAGE}.compression.pipeline"]
    assert not {i for i in local if i.startswith(PACKAGE)}, f"function-local package imports in {path}: {local}"


def test_the_package_imports_no_deprecated_old_path():
    for module, imports in _graph(top_level_only=False).items():
        old = sorted(i for i in imports if new_name(i) is not None)
        assert not old, f"{module} imports {old}: import {[new_name(i) for i in old]} instead"


def test_every_old_path_names_a_module_that_exists():
    modules = _modules()
    for old, new in MOVED.items():
        assert new in modules, f"{old} -> {new}: no such module"
        assert old not in modules, f"{old} still exists as a module next to its new path {new}"
