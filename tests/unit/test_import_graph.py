"""No import cycle inside ``mole/``: the graph of module-level imports between mole's modules has no cycle.

Imports inside function bodies are left out of the graph (they run when the function is called, so they
cannot deadlock an import), but each one is counted: ``python tests/unit/test_import_graph.py`` prints the
cycles of both graphs and the number of function-body imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mole"


def _modules(package: Path) -> dict[str, Path]:
    """``{"mole.model.inject": path, "mole.model": path/__init__.py, ...}`` for every ``.py`` file."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imported(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that executing ``node`` inside module ``name`` imports (its own packages,
    always loaded before it, excepted unless a name is taken from them)."""
    if isinstance(node, ast.Import):
        wanted = {alias.name for alias in node.names}
        attributes_of = set()
    else:
        base = name.split(".") if is_package else name.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            source = ".".join([*base, node.module] if node.module else base)
        else:
            source = node.module or ""
        submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
        wanted = submodules | {source}
        # ``from pkg import name`` reads pkg's namespace only when a name is not a submodule
        attributes_of = {source} if len(submodules) < len(node.names) else set()
    out = set()
    for target in wanted:
        for module in {target, *_ancestors(target)} & modules.keys():
            if module != name and (module not in _ancestors(name) or module in attributes_of):
                out.add(module)
    return out


def import_graph(package: Path = PACKAGE, function_bodies: bool = False) -> tuple[dict[str, set[str]], list[str]]:
    """``(graph, deferred)``: module -> modules it imports at import time (with ``function_bodies``, also the
    ones imported inside functions), and ``"module:line"`` of every import of a mole module inside a function."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    deferred: list[str] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"

        def visit(nodes: list[ast.stmt], in_function: bool, name: str = name, is_package: bool = is_package) -> None:
            for node in nodes:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    targets = _imported(node, name, is_package, modules)
                    if targets and in_function:
                        deferred.append(f"{name}:{node.lineno}")
                    if not in_function or function_bodies:
                        graph[name] |= targets
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(node.body, True)
                elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue  # read by type checkers only
                else:
                    for child in ast.iter_child_nodes(node):
                        if isinstance(child, ast.stmt):
                            visit([child], in_function)
                        elif isinstance(child, ast.excepthandler):
                            visit(child.body, in_function)

        visit(ast.parse(path.read_text(), filename=str(path)).body, False)
    return graph, deferred


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_no_import_cycle_inside_mole():
    graph, _ = import_graph()
    assert len(graph) > 50 and "mole.model.inject" in graph["mole.pipeline"]  # the scan found the package
    assert cycles(graph) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_a_cycle_through_a_package_namespace_is_found(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "ROOT = 1\nfrom pkg.a import f\n",
        "pkg/a.py": "from pkg import ROOT\n\ndef f():\n    from pkg.b import g\n    return g\n",
        "pkg/b.py": "from .a import f\n",
    })
    graph, deferred = import_graph(package)
    assert cycles(graph) == [["pkg", "pkg.a"]]
    assert deferred == ["pkg.a:4"]
    assert cycles(import_graph(package, function_bodies=True)[0]) == [["pkg", "pkg.a", "pkg.b"]]


def test_submodules_and_type_checking_imports_make_no_cycle(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nfrom pkg import b\nif TYPE_CHECKING:\n    from pkg.c import C\n"
                    "def f():\n    return b\n",
        "pkg/b.py": "",
        "pkg/c.py": "import pkg.a\nclass C:\n    pass\n",
    })
    graph, _ = import_graph(package)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": set(), "pkg.c": {"pkg.a"}}
    assert cycles(graph) == []


if __name__ == "__main__":
    package = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE
    graph, deferred = import_graph(package)
    print(f"modules: {len(graph)}")
    print(f"import cycles (module level): {len(cycles(graph))} {cycles(graph)}")
    hoisted = cycles(import_graph(package, function_bodies=True)[0])
    print(f"import cycles counting function-body imports: {len(hoisted)} {hoisted}")
    print(f"function-body imports of mole modules: {len(deferred)}")
    pytest.main  # noqa: B018  (pytest is imported for the tests above)
