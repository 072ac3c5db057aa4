"""The project's MLflow pyfunc model, logged as code (MLflow's "models from code"): nothing is pickled.

MLflow runs this file when it loads a logged model: ``load_context`` rebuilds the network from the model's
``weights.pt`` + ``model.json`` through the library's whitelisted builder (:mod:`pipeline.models.serialization`),
and ``predict`` scores a batch by the model's kind (the model's ``model_config``) with
:func:`pipeline.models.scoring.score`. The library travels with the model (``code_paths``), so it needs only
torch, numpy, pandas and mlflow where it is loaded.

* ``density``: uint8 images ``(N, C, H, W)`` -> a table of each image's ``bits_per_dim`` and ``standard_error``
  (:func:`pipeline.evaluation.bits_per_dim_per_image`: the evaluation protocol's estimator from the certified
  bounds, averaged over ``passes`` draws, reproducible);
* ``classify``: uint8 images -> class probabilities ``(N, K)``;
* ``toy``: float32 points ``(N, 2)`` -> their log-density, with the exact 2-D log-determinant.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class IResNetPyfuncModel(PythonModel):
    def load_context(self, context) -> None:
        from pipeline.models.serialization import load_model_folder

        self.model = load_model_folder(context.artifacts["model"])
        self.config = dict(context.model_config or {})

    # np.ndarray: a hint MLflow infers no schema from (the logged signature is the schema: uint8 image tensors, or
    # float points) and that evaluates at class creation (no `from __future__ import annotations` in this file)
    def predict(self, context, model_input: np.ndarray, params=None):
        import pandas as pd

        from pipeline.models.scoring import score

        try:
            with _thread_budget():
                answer = score(self.model, self.config["kind"], np.asarray(model_input), self.config)
        except ValueError as exc:  # a request of the wrong form: HTTP 400 with the reason, not a traceback
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        if self.config["kind"] == "density":
            return pd.DataFrame(answer)
        (values,) = answer.values()
        return values


SERVING_THREADS_ENV = "IRESNET_SERVING_THREADS"


def _serving_threads() -> int:
    """The threads one scoring call may use: ``IRESNET_SERVING_THREADS``, else the usable cores shared among the
    server's workers (``MLFLOW_MODELS_WORKERS``), never more than the process already uses (a training process that
    loads the model keeps its own budget)."""
    import os

    import torch

    from pipeline.training.device import usable_cores

    for name in (SERVING_THREADS_ENV, "MLFLOW_MODELS_WORKERS"):
        value = os.environ.get(name, "")
        if value and (not value.isdigit() or int(value) < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if os.environ.get(SERVING_THREADS_ENV):
        return int(os.environ[SERVING_THREADS_ENV])
    workers = int(os.environ.get("MLFLOW_MODELS_WORKERS") or 1)
    return max(1, min(torch.get_num_threads(), usable_cores() // workers))


class _thread_budget:
    """Scoring under :func:`_serving_threads` threads; the process's setting comes back after."""

    def __enter__(self) -> None:
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(_serving_threads())

    def __exit__(self, *exc) -> None:
        import torch

        torch.set_num_threads(self.saved)


mlflow.models.set_model(IResNetPyfuncModel())
