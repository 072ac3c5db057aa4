"""Invertible transforms: residual blocks, ActNorm, reshapes, and their estimators."""

from pipeline.transforms.actnorm import ActNorm
from pipeline.transforms.base import InverseReport, Transform, TransformSequence
from pipeline.transforms.coupling import SplitPriorCoupling
from pipeline.transforms.inverse import (
    INVERSE_METHODS,
    FixedPointConfig,
    FixedPointResult,
    InverseDidNotConverge,
    fixed_point_inverse,
    solve_fixed_point,
)
from pipeline.transforms.logdet import (
    ESTIMATORS,
    ExactLogDet,
    LogDetEstimator,
    PowerSeriesLogDet,
    RussianRouletteLogDet,
    make_estimator,
    sample_probe,
)
from pipeline.transforms.logit import LogitTransform
from pipeline.transforms.reshape import InjectivePad, Squeeze
from pipeline.transforms.residual import InvertibleResidualBlock, using_estimator

__all__ = [
    "ESTIMATORS",
    "INVERSE_METHODS",
    "ActNorm",
    "ExactLogDet",
    "FixedPointConfig",
    "FixedPointResult",
    "InjectivePad",
    "InverseDidNotConverge",
    "InverseReport",
    "InvertibleResidualBlock",
    "LogDetEstimator",
    "LogitTransform",
    "PowerSeriesLogDet",
    "RussianRouletteLogDet",
    "SplitPriorCoupling",
    "Squeeze",
    "Transform",
    "TransformSequence",
    "fixed_point_inverse",
    "make_estimator",
    "sample_probe",
    "solve_fixed_point",
    "using_estimator",
]
