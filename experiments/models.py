"""Trained models as MLflow Models: logged as a pyfunc model from code, registered, loaded by any reference.

:func:`log_pyfunc_model` logs the network as data (``weights.pt`` + ``model.json``,
:mod:`pipeline.models.serialization`) inside an MLflow Model whose flavour is ``python_function``, written as code
(``experiments/pyfunc_model.py``): the run then shows a logged model with its signature and input example,
``mlflow.pyfunc.load_model("runs:/ID/model")`` and ``mlflow models serve`` work, and ``register_model`` adds a
version in the Model Registry. Nothing is pickled.

:func:`load_model` takes a run id, ``runs:/ID/NAME``, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` and rebuilds
the network with the library; runs logged before MLflow Models (``model/weights.pt`` + ``model/model.json`` as
plain artifacts) load as before.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from torch import nn

from experiments.metric_logging import log_metrics
from experiments.tracking import active_run_id
from experiments.tracking_store import PROJECT_ROOT, configure_tracking, retry_tracking_write
from pipeline.models.scoring import input_shape

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the name of a run's (main) logged model: runs:/RUN_ID/model
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
LIBRARY = PROJECT_ROOT / "pipeline"  # travels with each model (code_paths): the model loads without the project
MODEL_URI_TAG = "model_uri"  # run tag: the URI of the run's logged model (report and sweep link to it)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def signature(kind: str, model: nn.Module, config: dict[str, Any]) -> ModelSignature:
    """What the served model takes and returns: uint8 images (N, C, H, W) or float32 points (N, 2)."""
    shape = input_shape(model)
    if kind == "toy":
        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))])
        return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float64), (-1,))]))
    c, h, w = shape
    pad, repeat = int(config.get("pad", 0)), int(config.get("repeat_channels", 1))
    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, c // repeat, h - 2 * pad, w - 2 * pad))])
    if kind == "density":
        return ModelSignature(inputs, Schema([ColSpec("double", "bits_per_dim"), ColSpec("double", "standard_error")]))
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float64), (-1, int(config["num_classes"])))]))


def _requirements() -> list[str]:
    # stated, not inferred: MLflow's inference loads the model in a subprocess to see what it imports
    import pandas

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pandas.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


def log_pyfunc_model(
    model: nn.Module,
    kind: str,
    config: dict[str, Any],
    input_example: np.ndarray,
    *,
    name: str = MODEL_NAME,
    register_as: str | None = None,
    step: int = 0,
    results: Mapping[str, float] | None = None,
    results_step: int | None = None,
) -> str:
    """Log ``model`` to the active run as an MLflow pyfunc model of ``kind``; returns its ``runs:/`` URI.

    ``config`` is what scoring needs beyond the network (``n_levels`` and ``pad`` of a density model, the
    normalisation of a classifier) and travels as the model's ``model_config``. With ``register_as`` the model
    becomes a new version of that registered model. MLflow checks the input example against the model before the
    model is logged (a served request of that form works).

    ``results`` (its test bits/dim or error, at optimizer step ``step``, the state the model is of; or at
    ``results_step``) are logged as the model's metrics first, so that the models list and the registry lead with
    them; MLflow then links the run's other metrics at ``step`` to the model too. A model whose logging fails is
    marked FAILED, not left PENDING.

    Logged once per run: where the run already has a READY model of ``name`` (a resume redoing the final step) it
    is kept (and registered, if it is not yet); one left PENDING or FAILED by an interrupted logging is completed.
    """
    from mlflow.entities import LoggedModelStatus

    run_id = active_run_id()
    client = mlflow.MlflowClient()
    uri = f"runs:/{run_id}/{name}"
    earlier = _models_of_run(client, run_id, name)
    ready = [m for m in earlier if m.status == LoggedModelStatus.READY]
    if ready:
        log.info("run %s already has its model %s (%s): not logged again", run_id, name, ready[0].model_id)
        if register_as is not None:
            _register_once(client, ready[0].model_id, run_id, register_as)
        return uri
    params = client.get_run(run_id).data.params
    logged = earlier[0] if earlier else retry_tracking_write(
        lambda: mlflow.initialize_logged_model(name=name, model_type=kind, params=params)
    )  # fmt: skip
    try:
        if results:
            log_metrics(results, step if results_step is None else results_step, model_id=logged.model_id)
        _write_pyfunc(model, kind, config, input_example, name, register_as, step, logged.model_id)
    except BaseException:
        try:
            if client.get_logged_model(logged.model_id).status != LoggedModelStatus.READY:
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception:  # the store itself failed: the model stays PENDING, the run's failure says why
            log.warning("could not mark logged model %s FAILED", logged.model_id)
        raise
    if name == MODEL_NAME:
        retry_tracking_write(lambda: mlflow.set_tag(MODEL_URI_TAG, uri))
    return uri


def _write_pyfunc(
    model: nn.Module,
    kind: str,
    config: dict[str, Any],
    input_example: np.ndarray,
    name: str,
    register_as: str | None,
    step: int,
    model_id: str,
) -> None:
    """The pyfunc model's files (the network, the library it needs, its signature) into logged model ``model_id``."""
    from pipeline.models.serialization import save_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "network"
        save_model(model, folder)
        library = shutil.copytree(LIBRARY, Path(tmp) / LIBRARY.name, ignore=shutil.ignore_patterns("__pycache__"))
        retry_tracking_write(
            lambda: mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_CODE),
                artifacts={"model": str(folder)},
                code_paths=[str(library)],
                model_config={"kind": kind, **config},
                signature=signature(kind, model, config),
                input_example=input_example,
                pip_requirements=_requirements(),
                registered_model_name=register_as,
                step=step,
                model_id=model_id,
            )
        )


def _models_of_run(client: mlflow.MlflowClient, run_id: str, name: str) -> list:
    """The logged models ``name`` of run ``run_id``, the newest first."""
    experiment = client.get_run(run_id).info.experiment_id
    found = retry_tracking_write(
        lambda: client.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'")
    )
    return sorted((m for m in found if m.name == name), key=lambda m: m.creation_timestamp, reverse=True)


def _register_once(client: mlflow.MlflowClient, model_id: str, run_id: str, register_as: str) -> None:
    versions = retry_tracking_write(lambda: client.search_model_versions(f"name = '{register_as}'"))
    if any(v.run_id == run_id for v in versions):
        return
    retry_tracking_write(lambda: mlflow.register_model(f"models:/{model_id}", register_as))


def model_uri(ref: str) -> str:
    """The MLflow URI of a reference: a run id means that run's logged model."""
    if RUN_ID.match(ref):
        return f"runs:/{ref}/{MODEL_NAME}"
    if ref.startswith(("runs:/", "models:/")):
        return ref
    raise ValueError(
        f"{ref!r} is not a model reference: give a run id, runs:/RUN_ID/{MODEL_NAME}, models:/NAME/VERSION or "
        "models:/NAME@ALIAS"
    )


def _no_model(uri: str, exc: Exception) -> ValueError:
    return ValueError(f"no model at {uri} in {mlflow.get_tracking_uri()}: {' '.join(str(exc).split())[:300]}")


def _download(uri: str, dst: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except Exception as exc:
        raise _no_model(uri, exc) from None


def load_model(ref: str, *, map_location: str = "cpu") -> nn.Module:
    """Rebuild the network of a logged model (in evaluation mode): ``ref`` is a run id, ``runs:/ID/NAME``,
    ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``. ValueError, naming the reference, if there is none."""
    from pipeline.models.serialization import SPEC_FILE, load_model_folder

    configure_tracking()
    uri = model_uri(ref)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _download(uri, tmp)
        for network in (folder / "artifacts" / "network", folder):  # an MLflow Model; a run from before them
            if (network / SPEC_FILE).exists():
                return load_model_folder(network, map_location=map_location)
        raise ValueError(f"{uri} is not a model of this project (no {SPEC_FILE} in it)")


def model_config(ref: str) -> dict[str, Any]:
    """What a logged pyfunc model knows beyond its network: ``kind`` (``density``, ``classify``, ``toy``), its
    dataset, and what scoring needs (``n_levels``, ``pad``; the normalisation of a classifier)."""
    configure_tracking()
    uri = model_uri(ref)
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as exc:
        raise _no_model(uri, exc) from None
    return dict(info.flavors.get("python_function", {}).get("config") or {})


def model_kind(ref: str) -> str:
    """The kind (``density``, ``classify``, ``toy``) of a logged pyfunc model."""
    return str(model_config(ref).get("kind"))


def require_kind(ref: str, kind: str, what: str) -> dict[str, Any]:
    """The model's config, or ValueError naming the reference when the model is of another kind than ``kind``."""
    config = model_config(ref)
    if config.get("kind") != kind:
        raise ValueError(f"{ref} is a {config.get('kind') or 'foreign'} model; {what} needs a {kind} model")
    return config
