"""The library (``pipeline/``) knows nothing of experiment tracking: training logs through a callback."""

import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_the_library_does_not_import_mlflow():
    code = (
        "import importlib, pkgutil, sys\n"
        "import pipeline\n"
        "for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('mlflow', 'optuna', 'experiments', 'analysis')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_library_makes_no_device_side_asserts():
    """A failed ``torch._assert_async`` on a GPU loses its message and leaves the CUDA context unusable (no
    checkpoint, no model, torchrun peers hung): the library validates data where it is loaded instead."""
    offenders = [
        str(path.relative_to(PROJECT_ROOT))
        for path in (PROJECT_ROOT / "pipeline").rglob("*.py")
        if "_assert_async" in path.read_text()
    ]
    assert offenders == []


LAYERS = ("pipeline", "experiments", "analysis", "benchmarks")  # each may import only those before it (benchmarks:
# the library and the experiments' configs, as a user would)


def _imports_of_modules() -> dict[str, set[str]]:
    """Every first-party module and the first-party modules it imports (anywhere in it, deferred imports too)."""
    import ast

    graph: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
                elif isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
            graph[name] = {m for m in found if m.split(".")[0] in LAYERS}
    return {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}


def test_no_package_imports_a_layer_above_it():
    rank = {package: i for i, package in enumerate(LAYERS)}
    upward = sorted(
        f"{module} imports {dep}"
        for module, deps in _imports_of_modules().items()
        for dep in deps
        if rank[dep.split(".")[0]] > rank[module.split(".")[0]]
    )
    assert upward == []


def test_no_import_cycles_between_modules():
    """A cycle (two modules importing each other, one import deferred into a function to make it load) means two
    concepts share one module's worth of code: split it instead."""
    graph = _imports_of_modules()
    # a package's __init__ re-exports its modules; a module importing its own package is not a cycle of concepts
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
