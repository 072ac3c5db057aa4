"""The experiment layer stays thin: entry points over library functions, in modules and functions a reader takes in
at once (the limits of the developers' guide)."""

import ast
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _python_files(package: str) -> list[Path]:
    return sorted((PROJECT_ROOT / package).rglob("*.py"))


def test_no_experiment_module_is_over_400_lines():
    long = {
        str(path.relative_to(PROJECT_ROOT)): n
        for path in _python_files("experiments")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_experiment_function_is_over_60_lines():
    long = {}
    for path in _python_files("experiments"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (n := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PROJECT_ROOT)}:{node.name}"] = n
    assert long == {}
