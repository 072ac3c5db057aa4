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
