"""Configuration: one preset table per model, options from type hints, and a setting's path to the layers."""

import pytest

from experiments import classify, density, toy
from experiments.config import build_parser, parse_config
from pipeline.layers.spectral import SpectralNormConv2d
from pipeline.models import CLASSIFIER_PRESETS, FLOW_PRESETS, VECTOR_FLOW_PRESETS, IResNetFlow


def test_an_entry_point_preset_names_a_model_preset_and_logs_concrete_values():
    cfg = density.config_from_preset("quick")
    arch = FLOW_PRESETS["quick"]
    assert cfg.architecture == "quick"
    assert (cfg.coeff, cfg.n_power_iterations, cfg.n_blocks) == (arch.coeff, arch.n_power_iterations, arch.n_blocks)
    assert cfg.flow_architecture(arch.input_shape) == arch
    paper = density.config_from_preset("paper-cifar10")
    assert paper.hidden_channels == (512,) and paper.n_terms == 5  # one width for every level, as the preset has
    # classify: the model preset, as the chosen variant of the paper's three models
    quick = classify.config_from_preset("quick")
    assert quick.n_blocks == CLASSIFIER_PRESETS["quick"].n_blocks
    vanilla = classify.config_from_preset("quick", model="resnet-bn").classifier_architecture((1, 28, 28), 10)
    assert vanilla.coeff is None and vanilla.norm == "none" and vanilla.branch_batchnorm
    assert toy.config_from_preset("quick").coeff == VECTOR_FLOW_PRESETS["quick"].coeff


def test_an_architecture_field_overrides_the_model_preset_and_the_rest_stays():
    cfg = density.config_from_preset("quick", architecture="mnist", n_blocks=(2, 2))
    arch = cfg.flow_architecture((1, 8, 8))
    assert arch.n_blocks == (2, 2) and arch.hidden_channels == (32, 32)  # the preset's one width, at every level
    assert arch.kernel_sizes == FLOW_PRESETS["mnist"].kernel_sizes and arch.input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="unknown flow architecture 'imagenet'"):
        density.config_from_preset("quick", architecture="imagenet")


def test_coeff_from_the_command_line_reaches_every_layers_power_iteration():
    """``-P coeff=0.7``: option -> DensityConfig.coeff -> FlowArchitecture.coeff -> SpectralConfig -> layer."""
    cfg = parse_config(density.DensityConfig, density.PRESETS, ["--coeff", "0.7", "--n-blocks", "1,1"], None)
    assert cfg.coeff == 0.7 and cfg.n_blocks == (1, 1)
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
    from dataclasses import asdict

    from experiments.config import config_for_resume
    from pipeline.training.checkpoint import save_checkpoint

    saved = asdict(density.config_from_preset("quick", epochs=3))
    for name in density.DensityConfig.BEFORE_FIELD_EXISTED:
        del saved[name]  # as an older version wrote it
    save_checkpoint(tmp_path / "old-run" / "last.pt", {"config": saved, "epoch": 1})
    cfg = config_for_resume(density.DensityConfig, "old-run", checkpoint_dir=str(tmp_path))
    arch = cfg.flow_architecture((1, 28, 28))
    assert (arch.logit_alpha, arch.split_prior, arch.fc_blocks) == (0.0, "unconditional", 0)  # not today's preset
    assert cfg.resume == "old-run" and cfg.epochs == 3 and cfg.estimator == saved["estimator"]
