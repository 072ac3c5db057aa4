"""The paper's tables, rebuilt from tracked runs (pandas), each beside the paper's numbers."""

from __future__ import annotations

import mlflow
import pandas as pd

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


def _top_level_runs(experiment: str, status_clause: str, filter_string: str) -> pd.DataFrame:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    query = status_clause + (f" and {filter_string}" if filter_string else "")
    runs = mlflow.search_runs([exp.experiment_id], filter_string=query)
    if "tags.mlflow.parentRunId" in runs:
        runs = runs[runs["tags.mlflow.parentRunId"].isna()]
    return runs.reset_index(drop=True)


def finished_runs(experiment: str, filter_string: str = "") -> pd.DataFrame:
    """FINISHED top-level runs of an experiment (empty frame if it does not exist), each with its resolved
    configuration as ``params.config.<option>`` columns (:func:`with_configuration`)."""
    return with_configuration(_top_level_runs(experiment, "attributes.status = 'FINISHED'", filter_string))


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


def unfinished_runs(experiment: str, filter_string: str = "") -> list[tuple[str, str, str]]:
    """``(run_id, run name, status)`` of the top-level runs matching ``filter_string`` that are not FINISHED."""
    runs = _top_level_runs(experiment, "attributes.status != 'FINISHED'", filter_string)
    return [(r["run_id"], r.get("tags.mlflow.runName", ""), r["status"]) for _, r in runs.iterrows()]


def config(row: pd.Series, name: str) -> object:
    """A run's resolved configuration value (``params.config.<name>``, see :func:`with_configuration`)."""
    return row.get(f"params.config.{name}")


def _column(row: pd.Series) -> str:
    model = config(row, "model")
    if model == "resnet":
        return "vanilla"
    if model == "resnet-bn":
        return "vanilla-bn"
    return f"c={float(config(row, 'coeff')):g}"


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
        "test_error",
        "paper_test_error",
        "certified_invertible",
        "max_block_lipschitz",
        "run_id",
        "model_uri",
    ]
    if classify_runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for _, r in classify_runs.iterrows():
        column = _column(r)
        rows.append(
            {
                "dataset": config(r, "dataset"),
                "model": config(r, "model"),
                "column": column,
                "test_error": r["metrics.test_error"],
                "paper_test_error": PAPER_TABLE2.get((config(r, "dataset"), column)),
                "certified_invertible": bool(r.get("metrics.certified_invertible", 0.0) == 1.0),
                "max_block_lipschitz": r.get("metrics.max_block_lipschitz"),
                "run_id": r["run_id"],
                "model_uri": _model_uri(r),
            }
        )
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "column", "run_id"]).reset_index(drop=True)


def table4(density_runs: pd.DataFrame) -> pd.DataFrame:
    """Test bits/dim per dataset (with standard error and bias bound), beside the paper's i-ResNet value."""
    columns = [
        "dataset",
        "model",
        "test_bpd",
        "test_standard_error",
        "test_bias_bound",
        "paper_bpd",
        "run_id",
        "model_uri",
    ]
    if density_runs.empty:
        return pd.DataFrame(columns=columns)
    rows = [
        {
            "dataset": config(r, "dataset"),
            "model": "i-ResNet",
            "test_bpd": r["metrics.test_bpd"],
            "test_standard_error": r["metrics.test_standard_error"],
            "test_bias_bound": r["metrics.test_bias_bound"],
            "paper_bpd": PAPER_TABLE4.get(config(r, "dataset"), {}).get("i-ResNet"),
            "run_id": r["run_id"],
            "model_uri": _model_uri(r),
        }
        for _, r in density_runs.iterrows()
    ]
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "run_id"]).reset_index(drop=True)
