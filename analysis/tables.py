"""The paper's tables, rebuilt from tracked runs (pandas), each beside the paper's numbers.

Runs are selected by what they are, not where they are: every training run carries the tag ``entry_point``
(``density``, ``classify``, ...), so a run lands in a table from whichever experiment it was logged to (``mlflow run
. -e density`` logs to "Default"). A run of an earlier release, without the tag, counts as a run of the entry point
its experiment is named after. A paper value stands beside a row only where the row follows the paper's protocol
(its dataset, trained on the whole training split, scored on the whole test split); the ``protocol`` column says
which protocol each row follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlflow
import pandas as pd

from experiments.tracking import ENTRY_POINT_TAG, metric_value

# Table 2 (test error %), keyed by (dataset, column); columns "vanilla" and "c=0.9" ... "c=0.5"
PAPER_TABLE2: dict[tuple[str, str], float] = {
    **{
        ("mnist", k): v
        for k, v in {"vanilla": 0.38, "c=0.9": 0.40, "c=0.8": 0.42, "c=0.7": 0.40, "c=0.6": 0.42, "c=0.5": 0.86}.items()
    },
    **{
        ("cifar10", k): v
        for k, v in {
            "resnet-164": 5.50,
            "vanilla": 6.69,
            "c=0.9": 6.78,
            "c=0.8": 6.86,
            "c=0.7": 6.93,
            "c=0.6": 7.72,
            "c=0.5": 8.71,
        }.items()
    },
    **{
        ("cifar100", k): v
        for k, v in {
            "resnet-164": 24.30,
            "vanilla": 23.97,
            "c=0.9": 24.58,
            "c=0.8": 24.99,
            "c=0.7": 25.99,
            "c=0.6": 27.30,
            "c=0.5": 29.45,
        }.items()
    },
}
# Table 4 (bits/dim): i-ResNet's row, and the others for reference
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "mnist": {"i-ResNet": 1.05, "Glow": 1.05, "Real NVP": 1.06, "FFJORD": 0.99, "Residual Flows": 0.97},
    "cifar10": {"i-ResNet": 3.45, "Glow": 3.35, "Real NVP": 3.49, "FFJORD": 3.40, "Residual Flows": 3.28},
}


# the full test splits of the paper's datasets: a row scored on fewer images follows another protocol
PAPER_TEST_IMAGES = {"mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000}


def tracked_runs(experiments: Sequence[str] = (), filter_string: str = "") -> pd.DataFrame:
    """The top-level runs (any state) of the experiments named (every experiment where none are), matching
    ``filter_string``, each with the entry point that made it in column ``entry_point`` and its experiment's name
    in ``experiment``. Nested runs (a sweep's trials) are the sweep's, not rows of their own."""
    known = {e.name: e.experiment_id for e in mlflow.search_experiments()}
    missing = [name for name in experiments if name not in known]
    if missing:
        raise ValueError(f"no experiment {', '.join(map(repr, missing))} in {mlflow.get_tracking_uri()}")
    ids = [known[name] for name in experiments] if experiments else list(known.values())
    runs = mlflow.search_runs(ids, filter_string=filter_string) if ids else pd.DataFrame()
    if runs.empty:
        return pd.DataFrame(columns=["run_id", "status", "entry_point", "experiment"])
    if "tags.mlflow.parentRunId" in runs:
        runs = runs[runs["tags.mlflow.parentRunId"].isna()]
    names = {experiment_id: name for name, experiment_id in known.items()}
    runs = runs.assign(experiment=runs["experiment_id"].map(names))
    tagged = runs.get(f"tags.{ENTRY_POINT_TAG}", pd.Series(None, index=runs.index))
    runs["entry_point"] = tagged.where(tagged.notna(), runs["experiment"])  # a run of an earlier release
    return runs.reset_index(drop=True)


def runs_of(runs: pd.DataFrame, entry_point: str) -> pd.DataFrame:
    """The runs (of :func:`tracked_runs`) that ``entry_point`` made."""
    return runs[runs["entry_point"] == entry_point].reset_index(drop=True)


def finished_runs(
    entry_point: str, *, experiments: Sequence[str] = (), filter_string: str = "", runs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The FINISHED top-level runs of ``entry_point`` (from ``runs``, else from the store), each with its resolved
    configuration as ``params.config.<option>`` columns (:func:`with_configuration`)."""
    runs = tracked_runs(experiments, filter_string) if runs is None else runs
    own = runs_of(runs, entry_point)
    return with_configuration(own[own["status"] == "FINISHED"].reset_index(drop=True))


def empty_reason(runs: pd.DataFrame, entry_point: str, where: str) -> str:
    """Why a table of ``entry_point``'s runs is empty: no such run in ``where``, or the states of those that are
    there but did not finish."""
    own = runs_of(runs, entry_point)
    if own.empty:
        return f"no run of `{entry_point}` in {where}; `mlflow run . -e {entry_point}` makes one"
    listed = ", ".join(
        f"`{r['run_id']}` ({r.get('tags.mlflow.runName') or 'unnamed'}, {r['status']})" for _, r in own.iterrows()
    )
    return f"no run of `{entry_point}` in {where} finished: {listed}"


def with_configuration(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's resolved configuration in ``params.config.<option>`` columns.

    Runs logged before the option groups have it as those params already. Later runs log only their preset and the
    options set away from it, and the whole resolved configuration by group as the artifact ``config.json``: its
    values are read into the same columns (as strings, as params are), so old and new runs read alike.
    """
    if runs.empty:
        return runs
    runs = runs.copy()
    for i, row in runs.iterrows():
        if isinstance(row.get("params.config.dataset"), str) or isinstance(row.get("params.config.datasets"), str):
            continue  # a run from before the option groups
        try:
            grouped = mlflow.artifacts.load_dict(f"runs:/{row['run_id']}/config.json")
        except Exception:  # no configuration artifact (a run stopped before it was logged)
            continue
        for group in grouped.values():
            for name, value in group.items() if isinstance(group, dict) else ():
                text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                runs.loc[i, f"params.config.{name}"] = text
    return runs


def config(row: pd.Series, name: str) -> Any:
    """A run's resolved configuration value (``params.config.<name>``, see :func:`with_configuration`)."""
    return row.get(f"params.config.{name}")


def config_int(row: pd.Series, name: str, default: int) -> int:
    """An integer option of a run, or ``default`` for a run of a release that did not have it."""
    value = config(row, name)
    missing = value in (None, "None", "") or value != value  # NaN: a column of search_runs this run lacks
    return default if missing else int(float(str(value)))


def _column(row: pd.Series) -> str:
    model = config(row, "model")
    if model == "resnet":
        return "vanilla"
    if model == "resnet-bn":
        return "vanilla-bn"
    return f"c={float(config(row, 'coeff')):g}"


def metric(row: pd.Series, name: str) -> float | None:
    """A run's metric under its name or, for a run of an earlier release, its old one."""
    return metric_value(row, name, prefix="metrics.")


# how many times the paper's code repeats a density image's channels (MNIST's grey digit as RGB: 3,072 dimensions)
PAPER_DENSITY_CHANNEL_REPEATS = {"mnist": 3, "cifar10": 1}


def protocol(row: pd.Series, test_images: float | None, *, density: bool = False) -> str:
    """``paper`` where the row follows the paper's protocol (its dataset, trained on the whole training split,
    scored on the whole test split; for a density run, the images as the paper's code gives them to the flow, e.g.
    MNIST as 3 channels); else which protocol it follows."""
    dataset = str(config(row, "dataset"))
    if dataset not in PAPER_TEST_IMAGES:
        return f"{dataset} (not a dataset of the paper's)"
    if density:
        repeats = config_int(row, "repeat_channels", 1)  # a run of an earlier release: its images as they are
        paper_repeats = PAPER_DENSITY_CHANNEL_REPEATS[dataset]
        if repeats != paper_repeats:
            return (
                f"{dataset} with its channels repeated {repeats}x (the paper's code {paper_repeats}x): bits/dim per "
                "another number of dimensions"
            )
    held_out = float(config(row, "validation_fraction") or 0.0)
    if held_out > 0:
        return f"{dataset}, {held_out:.0%} of the training split held out for validation"
    if test_images is not None and int(test_images) < PAPER_TEST_IMAGES[dataset]:
        return f"{dataset}, {int(test_images):,} of {PAPER_TEST_IMAGES[dataset]:,} test images"
    return "paper"


def _model_uri(row: pd.Series) -> str:
    """The row's logged MLflow Model (``runs:/ID/model``, to load or serve it); runs from before MLflow Models
    have their model as plain artifacts, which ``experiments.models.load_model(run_id)`` still reads."""
    uri = row.get("tags.model_uri")
    return uri if isinstance(uri, str) and uri else ""


def table2(classify_runs: pd.DataFrame) -> pd.DataFrame:
    """Test error vs coefficient (and the vanilla models), one row per run, with the paper's value."""
    columns = [
        "dataset",
        "model",
        "column",
        "protocol",
        "test_error",
        "paper_test_error",
        "certified_invertible",
        "max_block_lipschitz",
        "run_id",
        "run_name",
        "model_uri",
    ]
    if classify_runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for _, r in classify_runs.iterrows():
        column, followed = _column(r), protocol(r, None)
        rows.append(
            {
                "dataset": config(r, "dataset"),
                "model": config(r, "model"),
                "column": column,
                "protocol": followed,
                "test_error": metric(r, "test/error_percent"),
                "paper_test_error": PAPER_TABLE2.get((config(r, "dataset"), column)) if followed == "paper" else None,
                "certified_invertible": metric(r, "lipschitz/certified_invertible") == 1.0,
                "max_block_lipschitz": metric(r, "lipschitz/max_block_certified"),
                "run_id": r["run_id"],
                "run_name": r.get("tags.mlflow.runName"),
                "model_uri": _model_uri(r),
            }
        )
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "column", "run_id"]).reset_index(drop=True)


def table4(density_runs: pd.DataFrame) -> pd.DataFrame:
    """Test bits/dim per dataset (with standard error and bias bound), beside the paper's i-ResNet value."""
    columns = [
        "dataset",
        "model",
        "protocol",
        "test_bpd",
        "test_standard_error",
        "test_bias_bound",
        "paper_bpd",
        "run_id",
        "run_name",
        "model_uri",
    ]
    if density_runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for _, r in density_runs.iterrows():
        followed = protocol(r, metric(r, "test/images"), density=True)
        paper = PAPER_TABLE4.get(str(config(r, "dataset")), {}).get("i-ResNet")
        rows.append(
            {
                "dataset": config(r, "dataset"),
                "model": "i-ResNet",
                "protocol": followed,
                "test_bpd": metric(r, "test/bpd"),
                "test_standard_error": metric(r, "test/standard_error_bpd"),
                "test_bias_bound": metric(r, "test/bias_bound_bpd"),
                "paper_bpd": paper if followed == "paper" else None,
                "run_id": r["run_id"],
                "run_name": r.get("tags.mlflow.runName"),
                "model_uri": _model_uri(r),
            }
        )
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "run_id"]).reset_index(drop=True)
