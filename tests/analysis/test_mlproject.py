from dataclasses import fields
from pathlib import Path

import yaml

from analysis import mlproject
from experiments.tracking_store import PROJECT_ROOT


def test_the_committed_mlproject_is_the_generated_one():
    committed = (Path(PROJECT_ROOT) / "MLproject").read_text()
    assert committed == mlproject.render(), "run: python -m analysis.mlproject > MLproject"


def test_every_config_field_is_a_parameter_passed_to_its_option():
    spec = yaml.safe_load(mlproject.render())
    for name, (module, config_cls) in mlproject.ENTRY_POINTS.items():
        entry = spec["entry_points"][name]
        expected = {f.name for f in fields(config_cls)} - set(mlproject.SET_BY_MLFLOW_RUN)
        assert set(entry["parameters"]) == expected, name
        for field in expected:
            assert f"--{field.replace('_', '-')} {{{field}}}" in entry["command"], (name, field)
        assert entry["command"].startswith(f"python -m {module} ")
