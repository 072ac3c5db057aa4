import shlex

import pytest
import yaml

from analysis import mlproject
from experiments import density
from experiments.command_line import parse_config
from experiments.config import RESUME_OVERRIDABLE, config_from_preset, flat_options, option_types
from experiments.tracking_store import PROJECT_ROOT
from pipeline.models import FLOW_PRESETS


def test_the_committed_mlproject_is_the_generated_one():
    committed = (PROJECT_ROOT / "MLproject").read_text()
    assert committed == mlproject.render(), "run: python -m analysis.mlproject > MLproject"


def test_every_option_that_always_applies_is_a_typed_parameter_with_its_presets_value_passed_to_its_option():
    """MLflow logs every declared parameter: an option that applies only sometimes (``n_terms``), is unset or is a
    path in the project is left to ``-P`` (listed in a comment), so a run's params are what applied to it."""
    text = mlproject.render()
    spec = yaml.safe_load(text)["entry_points"]
    for name, (module, config_cls, presets) in mlproject.ENTRY_POINTS.items():
        for preset in presets or [None]:
            label = name if preset in (None, "quick") else f"{name}-{preset}"
            entry = spec[label]
            values = flat_options(config_from_preset(config_cls, presets, preset))
            options = set(option_types(config_cls)) - {*mlproject.SET_BY_MLFLOW_RUN, "preset", "resume"}
            expected = {o for o in options if mlproject.declared(config_cls, o, values[o])}
            assert set(entry["parameters"]) == expected, (name, preset)
            comment = text.split(f"  {label}:\n", 1)[1].split("parameters:", 1)[0]
            assert all(o in comment for o in options - expected), (name, preset)  # the rest, named
            for option in expected:
                assert f"--{option.replace('_', '-')} {{{option}}}" in entry["command"], (name, option)
            assert entry["command"].startswith(f"python -m {module} " + (f"--preset {preset} " if preset else ""))
        if "resume" in option_types(config_cls):
            assert set(spec[f"{name}-resume"]["parameters"]) == {"resume", *RESUME_OVERRIDABLE}
    coeff = spec["density-paper-cifar10"]["parameters"]["coeff"]
    assert coeff == {"type": "float", "default": 0.9}  # the paper's c, typed
    blocks = ",".join(str(n) for n in FLOW_PRESETS["quick"].n_blocks)  # a tuple, written as MLflow takes it
    assert spec["density"]["parameters"]["n_blocks"] == {"type": "string", "default": blocks} and "," in blocks


@pytest.mark.parametrize("entry, preset", [("density", "quick"), ("density-paper-cifar10", "paper-cifar10")])
def test_the_command_mlflow_run_builds_from_the_defaults_is_the_preset_itself(entry, preset):
    """The command with every default substituted (as ``mlflow run`` quotes it) parses to exactly the preset's
    configuration: no option is changed by being passed."""
    spec = yaml.safe_load(mlproject.render())["entry_points"][entry]
    values = {k: shlex.quote(str(v["default"])) for k, v in spec["parameters"].items()}
    argv = shlex.split(spec["command"].format(**values))[3:]  # after "python -m experiments.density"
    cfg = parse_config(density.DensityConfig, density.PRESETS, argv, None)
    assert flat_options(cfg) == flat_options(config_from_preset(density.DensityConfig, density.PRESETS, preset))
