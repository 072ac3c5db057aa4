import pytest
import torch

from pipeline.layers.branches import branch_lipschitz_bound
from pipeline.models import ClassifierArchitecture, iresnet_classifier, resnet_classifier
from pipeline.models.base import n_parameters
from pipeline.transforms import FixedPointConfig, InverseReport


def test_iresnet_features_reconstruct_the_input(float64):
    inverse = FixedPointConfig(atol=1e-12, rtol=1e-12, max_iterations=500)
    model = iresnet_classifier("quick", n_blocks=(2, 2, 2), inverse_config=inverse)  # 6 blocks: the check, quickly
    x = torch.randn(4, 1, 28, 28)
    for _ in range(3):
        model(x)
    model.eval()
    features = model.features(x)
    assert features.shape == (4, 4 * 4 * 4, 7, 7)
    report = InverseReport()
    x_rec = model.reconstruct(features, report=report)
    assert report.converged
    assert ((x_rec - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max() < 1e-8
    assert model(x).shape == (4, 10)
    for block in model.residual_blocks():
        assert branch_lipschitz_bound(block.branch, input_hw=block.input_shape[-2:]) < 1


def test_vanilla_resnet_is_the_same_architecture_unconstrained():
    iresnet, vanilla = iresnet_classifier("quick"), resnet_classifier("quick")
    assert vanilla.arch.coeff is None and not vanilla.arch.invertible and iresnet.arch.invertible
    assert n_parameters(iresnet) == n_parameters(vanilla)
    bn = resnet_classifier("quick", batchnorm=True)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for b in bn.residual_blocks() for m in b.branch.modules())
    assert bn(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_classifier_architecture_is_validated():
    with pytest.raises(ValueError, match="only with coeff=None"):
        ClassifierArchitecture(branch_batchnorm=True)
    with pytest.raises(ValueError, match="0 < c < 1"):
        ClassifierArchitecture(coeff=1.2)
    with pytest.raises(ValueError, match="one entry per stage"):
        ClassifierArchitecture(n_blocks=(1, 1), hidden_channels=(8,), strides=(1,))
    with pytest.raises(ValueError, match="needs a Lipschitz coefficient"):
        iresnet_classifier("quick", coeff=None)


def test_the_paper_presets_are_the_paper_codes_classifier():
    """jhjacobsen/invertible-resnet's conv_iResNet: injective zero channels appended, a position-major squeeze at
    each stride-2 stage, ActNorm before every block, an ELU on every block's input but the first, and a head of
    BatchNorm (momentum 0.9), ReLU, average pooling and a linear map."""
    import torch

    from pipeline.models.classifier import CLASSIFIER_PRESETS, ResidualClassifier
    from pipeline.transforms import ActNorm, Squeeze
    from pipeline.transforms.residual import InvertibleResidualBlock

    model = ResidualClassifier(CLASSIFIER_PRESETS["paper-mnist"])
    squeezes = [m for m in model.modules() if isinstance(m, Squeeze)]
    assert [s.order for s in squeezes] == ["position_major"] * 2
    steps = [m for stage in model.stages for m in stage.transforms]
    blocks = [i for i, m in enumerate(steps) if isinstance(m, InvertibleResidualBlock)]
    assert len(blocks) == 39 and all(isinstance(steps[i - 1], ActNorm) for i in blocks)
    first_layers = [type(steps[i].branch[0]).__name__ for i in blocks]
    assert first_layers[0] != "ELU" and set(first_layers[1:]) == {"ELU"}
    batchnorm, relu = model.head[0], model.head[1]
    assert isinstance(batchnorm, torch.nn.BatchNorm2d) and batchnorm.momentum == 0.9
    assert isinstance(relu, torch.nn.ReLU)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.pad(x)[:, :1], x) and not model.pad(x)[:, 1:].any()  # zeros appended after the input
    quick = ResidualClassifier(CLASSIFIER_PRESETS["quick"])  # the library's own choices stay
    assert {m.order for m in quick.modules() if isinstance(m, Squeeze)} == {"channel_major"}
