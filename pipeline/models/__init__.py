"""Models: the multi-scale flow, the classifiers and the vector flow, with preset builders."""

from pipeline.models.base import FlowModel
from pipeline.models.classifier import (
    CLASSIFIER_MODELS,
    CLASSIFIER_PRESETS,
    ClassifierArchitecture,
    ResidualClassifier,
    classifier_variant,
    iresnet_classifier,
    resnet_classifier,
)
from pipeline.models.flow import (
    FLOW_PRESETS,
    FlowArchitecture,
    IResNetFlow,
    iresnet_flow,
)
from pipeline.models.toy import VECTOR_FLOW_PRESETS, VectorFlow, VectorFlowArchitecture, vector_flow

__all__ = [
    "CLASSIFIER_MODELS",
    "CLASSIFIER_PRESETS",
    "FLOW_PRESETS",
    "VECTOR_FLOW_PRESETS",
    "ClassifierArchitecture",
    "FlowArchitecture",
    "FlowModel",
    "IResNetFlow",
    "ResidualClassifier",
    "VectorFlow",
    "VectorFlowArchitecture",
    "classifier_variant",
    "iresnet_classifier",
    "iresnet_flow",
    "resnet_classifier",
    "vector_flow",
]
