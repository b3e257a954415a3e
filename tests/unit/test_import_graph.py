"""No import cycle inside ``mole/``, and imports at module top.

The graph of imports between mole's modules, counting the ones inside function bodies too, has no cycle.
A function imports late only a module of :data:`LAZY_IMPORTS`, each there for a stated reason (an optional
extra, or a heavy library that one path of one command needs), or, inside a module of :data:`LIGHT`, a mole
module that loads torch: the commands start, and a usage or config error ends, without importing torch.
``python tests/unit/test_import_graph.py`` prints the cycles of both graphs and the function-body imports,
of mole modules and overall.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mole"

# the modules a function body may import (a name and its submodules), and why each waits for the call
LAZY_IMPORTS = {
    "lm_eval": "lm-eval-harness builds its task registry on import (seconds); only evaluation needs it",
    "deepspeed": "optional extra mole[deepspeed], CUDA only",
    "bitsandbytes": "optional extra mole[quant]: only model.quantization=nf4/int8 needs it",
    "submitit": "optional extra mole[slurm]: only the SLURM launcher needs it",
    "mixlora": "optional: only mole-export of a MixLoRA run needs it",
    "peft": "only mole-export needs it; importing peft costs seconds at every command's start",
    "datasets": "only data from the Hugging Face Hub needs it; importing it costs seconds",
    "matplotlib": "only mole-analyze's figures need it",
    "sklearn": "only mole-analyze's t-SNE needs it; importing it costs seconds",
    "torch._dynamo": "loaded by torch.compile; only trainer.compile needs it",
    "transformers.modeling_gguf_pytorch_utils": "imports the gguf reader (seconds); only a GGUF model's first conversion needs it",
    "torch._subclasses": "fake tensors: only the memory estimate (mole-params estimate_memory=true) needs them",
    "torch.profiler": "only the memory estimate's measured check needs it",
    "transformers.masking_utils": "present in newer transformers only; the memory estimate patches it when it exists",
}


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


# imported without torch (what a command loads before it knows it has work to do); a function of one of
# them imports the heavy mole modules it calls
LIGHT = ("mole", "mole.config", "mole.config_schema", "mole.run_dir", "mole.report", "mole.report_paper",
         "mole.recipes", "mole.recipes.report", "mole.utils", "mole.utils.errors", "mole.utils.secrets",
         "mole.cli", "mole.cli.common", "mole.cli.sweep", "mole.cli.hydra_notes", "mole.cli.train", "mole.cli.eval",
         "mole.cli.params", "mole.cli.analyze", "mole.cli.generate", "mole.cli.export", "mole.cli.report")


def function_body_imports(package: Path = PACKAGE) -> list[tuple[str, str]]:
    """``("module:line", imported module)`` for every import statement inside a function (``from . import x``
    resolved to its absolute name)."""
    found = []
    for name, path in _modules(package).items():
        for fn in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(f"{name}:{node.lineno}", alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    prefix = base[: len(base) - node.level + 1] if node.level else []
                    found.append((f"{name}:{node.lineno}", ".".join([*prefix, node.module] if node.module else prefix)))
    return sorted(set(found))


def is_lazy(module: str) -> bool:
    return any(module == lazy or module.startswith(lazy + ".") for lazy in LAZY_IMPORTS)


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
    graph, _ = import_graph(function_bodies=True)
    assert len(graph) > 50 and "mole.model.inject" in graph["mole.build"]  # the scan found the package
    assert cycles(graph) == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("layer, must_not_reach", [
    # training is handed its evaluation (the model-selection score) by the train recipe
    ("mole.training", ("mole.eval", "mole.report", "mole.recipes")),
    # the builders construct; running, evaluating and writing the run directory are the recipes' part
    ("mole.build", ("mole.training", "mole.eval", "mole.report", "mole.recipes", "mole.run_dir")),
])
def test_layers(layer, must_not_reach):
    graph, _ = import_graph(function_bodies=True)
    for module in [m for m in graph if m == layer or m.startswith(layer + ".")]:
        bad = sorted(m for m in reachable(graph, module) if m.split(".")[:2] in [p.split(".") for p in must_not_reach])
        assert bad == [], f"{module} imports {bad}"


def allowed_late(where: str, module: str) -> bool:
    """A lazy third-party module anywhere; a heavy mole module inside a light one."""
    importer = where.split(":")[0]
    return is_lazy(module) or (importer in LIGHT and module.split(".")[0] == "mole" and module not in LIGHT)


def test_functions_import_only_the_lazy_modules():
    late = [f"{where} imports {module}" for where, module in function_body_imports() if not allowed_late(where, module)]
    assert late == [], "move these imports to the module's top, or name the module in LAZY_IMPORTS with the reason"


def test_the_light_modules_load_no_torch():
    assert set(LIGHT) <= set(_modules(PACKAGE))
    code = f"import sys\nfor m in {list(LIGHT)!r}:\n    __import__(m)\nprint(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_a_late_import_is_found(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import json\n\ndef f():\n    import lm_eval.tasks\n    from . import b\n    return b\n",
        "pkg/b.py": "class C:\n    def m(self):\n        from os import path\n        return path\n",
    })
    found = function_body_imports(package)
    assert found == [("pkg.a:4", "lm_eval.tasks"), ("pkg.a:5", "pkg"), ("pkg.b:3", "os")]
    assert [is_lazy(module) for _, module in found] == [True, False, False]


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
    late = function_body_imports(package)
    print(f"function-body imports overall: {len(late)}")
    for where, module in late:
        print(f"  {where} {module}")
    pytest.main  # noqa: B018  (pytest is imported for the tests above)
