"""Configuration: option groups declared once, the model group as the library's architecture, presets as data,
options from type hints, and a setting's path to the layers."""

import importlib
from dataclasses import dataclass

import pytest

from analysis import report, reproduce
from experiments import classify, density, sweep, toy
from experiments.command_line import build_parser, parse_config
from experiments.config import (
    default_run_name,
    entry_point_module,
    flat_options,
    grouped_config,
    option_groups,
    option_help,
    option_types,
    run_parameters,
    run_tags,
    set_options,
)
from experiments.options import ArchitectureOptions
from pipeline.layers.spectral import SpectralNormConv2d
from pipeline.models import CLASSIFIER_PRESETS, FLOW_PRESETS, VECTOR_FLOW_PRESETS, IResNetFlow


def test_an_entry_point_preset_names_a_model_preset_and_logs_concrete_values():
    cfg = density.config_from_preset("quick")
    arch = FLOW_PRESETS["quick"]
    assert cfg.architecture == "quick" and cfg.architecture_overrides == {}
    options = flat_options(cfg)
    assert (options["coeff"], options["n_power_iterations"], options["n_blocks"]) == (
        arch.coeff, arch.n_power_iterations, arch.n_blocks)  # fmt: skip
    assert cfg.flow_architecture(arch.input_shape) == arch
    paper = density.config_from_preset("paper-cifar10")
    assert flat_options(paper)["hidden_channels"] == (512,) and paper.n_terms == 5  # one width for every level
    # classify: the model preset, as the chosen variant of the paper's three models
    quick = classify.config_from_preset("quick")
    assert quick.architecture_option("n_blocks") == CLASSIFIER_PRESETS["quick"].n_blocks
    vanilla = classify.config_from_preset("quick", model="resnet-bn").classifier_architecture((1, 28, 28), 10)
    assert vanilla.coeff is None and vanilla.norm == "none" and vanilla.branch_batchnorm
    assert toy.config_from_preset("quick").architecture_option("coeff") == VECTOR_FLOW_PRESETS["quick"].coeff


def test_an_architecture_field_overrides_the_model_preset_and_the_rest_stays():
    cfg = density.config_from_preset("quick", architecture="mnist", n_blocks=(2, 2))
    arch = cfg.flow_architecture((1, 8, 8))
    assert arch.n_blocks == (2, 2) and arch.hidden_channels == (32, 32)  # the preset's one width, at every level
    assert arch.kernel_sizes == FLOW_PRESETS["mnist"].kernel_sizes and arch.input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="unknown architecture 'imagenet'"):
        density.config_from_preset("quick", architecture="imagenet")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['strides'\]"):  # a classifier's field, not a flow's
        density.config_from_preset("quick", strides=(1, 2))


def test_coeff_from_the_command_line_reaches_every_layers_power_iteration():
    """``-P coeff=0.7``: option -> architecture_overrides -> FlowArchitecture.coeff -> SpectralConfig -> layer."""
    cfg = parse_config(density.DensityConfig, density.PRESETS, ["--coeff", "0.7", "--n-blocks", "1,1"], None)
    assert cfg.architecture_overrides == {"coeff": 0.7, "n_blocks": (1, 1)}
    model = IResNetFlow(cfg.flow_architecture((1, 28, 28)), estimator=cfg.training_estimator())
    layers = [m for m in model.modules() if isinstance(m, SpectralNormConv2d)]
    assert layers and all(m.spectral.coeff == 0.7 and m.coeff == 0.7 for m in layers)
    assert all(m.n_power_iterations == FLOW_PRESETS["quick"].n_power_iterations for m in layers)


def test_options_take_their_types_from_the_resolved_type_hints():
    args = build_parser(classify.ClassifyConfig, classify.PRESETS, None).parse_args(
        ["--coeff", "0.5", "--n-blocks", "1 2 3", "--init-squeeze", "true", "--injective-padding", "", "--lr", "0.2"]
    )
    assert args.coeff == 0.5 and args.n_blocks == (1, 2, 3) and args.init_squeeze is True and args.lr == 0.2
    assert args.injective_padding is None  # an unset MLflow parameter: the preset's value
    with pytest.raises(SystemExit):
        build_parser(classify.ClassifyConfig, classify.PRESETS, None).parse_args(["--coeff", "high"])


def test_an_entry_point_without_presets_has_no_preset_option():
    from analysis import report

    assert "--preset" not in build_parser(report.ReportConfig, None, None).format_help()
    cfg = parse_config(report.ReportConfig, None, ["--estimator-images", "2"], None)
    assert cfg.estimator_images == 2


def test_a_run_checkpointed_before_the_flow_options_existed_resumes_with_the_flow_it_trained(tmp_path):
    from experiments.config import config_for_resume
    from pipeline.training.checkpoint import save_checkpoint

    # as a version before the option groups wrote it: every option a field of its own, without the four
    saved = flat_options(density.config_from_preset("quick", epochs=3))
    for name in density.DensityConfig.BEFORE_FIELD_EXISTED:
        del saved[name]
    save_checkpoint(tmp_path / "old-run" / "last.pt", {"config": saved, "epoch": 1})
    cfg = config_for_resume(density.DensityConfig, "old-run", checkpoint_dir=str(tmp_path))
    arch = cfg.flow_architecture((1, 28, 28))
    assert (arch.logit_alpha, arch.split_prior, arch.fc_blocks) == (0.0, "unconditional", 0)  # not today's preset
    assert cfg.resume == "old-run" and cfg.epochs == 3 and cfg.estimator == saved["estimator"]


def test_a_run_resumes_with_the_options_it_was_checkpointed_with(tmp_path):
    from dataclasses import asdict

    from experiments.config import config_for_resume
    from pipeline.training.checkpoint import save_checkpoint

    started = density.config_from_preset("quick", epochs=3, coeff=0.7, n_blocks=(2, 2), lr=0.01)
    checkpoint = {"config": asdict(started), "epoch": 1, "entry_point": "experiments.density"}
    save_checkpoint(tmp_path / "run" / "last.pt", checkpoint)
    cfg = config_for_resume(density.DensityConfig, "run", checkpoint_dir=str(tmp_path), epochs=5)
    assert cfg.architecture_overrides == {"coeff": 0.7, "n_blocks": (2, 2)} and (cfg.lr, cfg.epochs) == (0.01, 5)
    with pytest.raises(ValueError, match="cannot change \\['coeff'\\] on resume.*-e density-resume"):
        config_for_resume(density.DensityConfig, "run", checkpoint_dir=str(tmp_path), coeff=0.5)


@pytest.mark.parametrize("config_cls", [density.DensityConfig, classify.ClassifyConfig, toy.ToyConfig])
def test_every_option_is_declared_once_in_one_group(config_cls):
    """The shared groups are declared once (in ``experiments.config``), the model group is the library's
    architecture dataclass: no entry point declares a field of it again, which ``option_types`` would refuse."""
    groups = option_groups(config_cls)
    assert set(groups) == set(option_types(config_cls))
    assert {"coeff", "n_power_iterations", "lipschitz"} <= {n for n, g in groups.items() if g == "model"}
    other = "inverse_tol" if config_cls is classify.ClassifyConfig else "estimator"
    assert groups["seed"] == "run" and groups[other] in ("inverse", "estimator")
    if config_cls is not toy.ToyConfig:  # the shared groups, and what an entry point adds to them
        assert (groups["dataset"], groups["epochs"], groups["eval_batch_size"]) == ("data", "training", "evaluation")
        assert groups["pad" if config_cls is density.DensityConfig else "augment"] == "data"

    @dataclass(frozen=True)
    class Redeclared(ArchitectureOptions):
        ARCHITECTURES = density.FLOW_PRESETS
        coeff: float = 0.5

    with pytest.raises(TypeError, match="declares \\['coeff'\\], which the architecture already declares"):
        option_types(Redeclared)


def test_a_run_logs_the_options_set_away_from_its_preset_and_the_whole_configuration_by_group():
    cfg = density.config_from_preset("quick", coeff=0.7, epochs=6, lr=0.01)  # epochs=6 is the preset's value
    assert set_options(cfg, density.PRESETS) == {"coeff": 0.7, "lr": 0.01}
    grouped = grouped_config(cfg, cfg.flow_architecture((1, 28, 28)))
    assert grouped["model"]["coeff"] == 0.7 and grouped["model"]["input_shape"] == (1, 28, 28)
    assert grouped["training"]["lr"] == 0.01 and grouped["data"]["dataset"] == "digits-mnist5k"
    assert grouped["estimator"]["estimator"] == "russian_roulette" and grouped["evaluation"]["se_tol"] == 5e-3
    # the model group keeps its own options beside the built architecture (the report reads the classifier's variant)
    vanilla = classify.config_from_preset("quick", model="resnet")
    model_group = grouped_config(vanilla, vanilla.classifier_architecture((1, 28, 28), 10))["model"]
    assert model_group["model"] == "resnet" and model_group["input_shape"] == (1, 28, 28)


def test_the_help_lists_options_by_group_and_a_second_preset_is_refused(capsys):
    text = build_parser(density.DensityConfig, density.PRESETS, None).format_help()
    assert text.index("data:") < text.index("model (fields of the architecture preset):") < text.index("run:")
    with pytest.raises(SystemExit):  # mlflow run appends -P preset=... after the entry point's own --preset
        parse_config(density.DensityConfig, density.PRESETS, ["--preset", "quick", "--preset", "paper-mnist"], None)
    assert "choose it by the entry point (-e density-paper-mnist)" in capsys.readouterr().err


ENTRY_CONFIGS = [
    density.DensityConfig, classify.ClassifyConfig, toy.ToyConfig, sweep.SweepConfig, report.ReportConfig,
    reproduce.ReproduceConfig,
]  # fmt: skip


@pytest.mark.parametrize("config_cls", ENTRY_CONFIGS, ids=lambda c: c.__name__)
def test_every_option_of_every_entry_point_has_one_line_of_help_in_its_help(config_cls):
    helps = option_help(config_cls)
    assert helps and all(text and "\n" not in text for text in helps.values()), [n for n, t in helps.items() if not t]
    module = importlib.import_module(entry_point_module(config_cls))
    text = " ".join(build_parser(config_cls, getattr(module, "PRESETS", None), None).format_help().split())
    for name, help_text in helps.items():
        if name == "preset":  # its own line: the choices and the default
            assert "--preset {" in text and "the preset every unset option takes its value from" in text
            continue
        assert f"--{name.replace('_', '-')}" in text and " ".join(help_text.split())[:40] in text, name


def test_a_run_logs_as_parameters_only_the_options_that_apply_to_it():
    roulette = run_parameters(density.config_from_preset("quick"))
    assert roulette["estimator"] == "russian_roulette" and "n_exact_terms" in roulette and "n_terms" not in roulette
    assert "data_dir" not in roulette and "download" not in roulette  # unset: the embedded digits
    series = run_parameters(density.config_from_preset("quick", estimator="power_series", n_terms=3))
    assert series["n_terms"] == "3" and "n_exact_terms" not in series and "roulette_p" not in series
    assert "momentum" not in run_parameters(classify.config_from_preset("quick", optimizer="adam"))


def test_a_run_is_named_by_its_entry_point_preset_and_changed_options():
    cfg = density.config_from_preset("quick", coeff=0.7, epochs=2, device="cpu")
    assert default_run_name(cfg) == "density-quick epochs=2 coeff=0.7"  # where it runs is not what it trains
    assert run_tags(cfg) == {"entry_point": "density", "preset": "quick"}


def test_relative_paths_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = density.config_from_preset("quick", checkpoint_dir="ckpt", data_dir="data")
    assert (cfg.checkpoint_dir, cfg.data_dir) == (str(tmp_path / "ckpt"), str(tmp_path / "data"))


def test_a_resumed_run_keeps_the_architecture_it_ran_with_when_the_presets_change(tmp_path):
    from dataclasses import asdict

    from experiments.config import config_for_resume, resolved_architecture
    from pipeline.training.checkpoint import save_checkpoint

    started = classify.config_from_preset("paper-mnist", epochs=3)
    assert started.architecture_option("squeeze_order") == "position_major"  # today's preset: the paper's code
    old = {"config": asdict(started), "epoch": 1, "entry_point": "experiments.classify"}
    save_checkpoint(tmp_path / "old" / "last.pt", old)  # before checkpoints recorded the architecture
    cfg = config_for_resume(classify.ClassifyConfig, "old", checkpoint_dir=str(tmp_path))
    assert (cfg.architecture_option("squeeze_order"), cfg.architecture_option("head_activation")) == (
        "channel_major",
        None,
    )  # what that run computed: the presets of its release
    recorded = resolved_architecture(started) | {"head_batchnorm_momentum": 0.5}
    save_checkpoint(tmp_path / "new" / "last.pt", {**old, "architecture": recorded})
    cfg = config_for_resume(classify.ClassifyConfig, "new", checkpoint_dir=str(tmp_path))
    assert resolved_architecture(cfg) == recorded  # every field as recorded, whatever the preset says now


@pytest.mark.parametrize("config_cls", ENTRY_CONFIGS, ids=lambda c: c.__name__)
def test_every_config_names_the_entry_point_that_runs_it(config_cls):
    """A run's tags, its usage line and its presets come from the config's entry point module: a config declared in
    a module of its own must name it (``ENTRY_POINT_MODULE``)."""
    module = importlib.import_module(entry_point_module(config_cls))
    assert module.ENTRY.config_cls is config_cls
