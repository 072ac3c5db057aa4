"""Invertible transforms: residual blocks, ActNorm, reshapes, and their estimators."""

from pipeline.transforms.actnorm import ActNorm
from pipeline.transforms.base import InverseReport, Transform, TransformSequence
from pipeline.transforms.inverse import FixedPointConfig, FixedPointResult, InverseDidNotConverge, fixed_point_inverse
from pipeline.transforms.logdet import (
    ESTIMATORS,
    ExactLogDet,
    LogDetEstimator,
    PowerSeriesLogDet,
    make_estimator,
    sample_probe,
)
from pipeline.transforms.reshape import InjectivePad, Squeeze
from pipeline.transforms.residual import InvertibleResidualBlock

__all__ = [
    "ESTIMATORS",
    "ActNorm",
    "ExactLogDet",
    "FixedPointConfig",
    "FixedPointResult",
    "InjectivePad",
    "InverseDidNotConverge",
    "InverseReport",
    "InvertibleResidualBlock",
    "LogDetEstimator",
    "PowerSeriesLogDet",
    "Squeeze",
    "Transform",
    "TransformSequence",
    "fixed_point_inverse",
    "make_estimator",
    "sample_probe",
]
