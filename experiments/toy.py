"""``mlflow run . -e toy``: 2-D toy densities, i-ResNet flow vs Glow (Fig. 2), and 1-D dynamics (Fig. 1).

    python -m experiments.toy                       # preset "quick": 8gaussians, both models, Fig. 1
    python -m experiments.toy --preset all          # every toy dataset
    python -m experiments.toy --preset paper        # 100 blocks of 2-64-64-64-2, as in the paper
    python -m experiments.toy --datasets moons,rings --models iresnet

Models come from :data:`TOY_MODELS` (a name -> builder registry), so another flow is one entry.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, cast

import mlflow
import numpy as np
import torch
from mlflow.data.numpy_dataset import from_numpy
from torch import Tensor, nn

from experiments.config import check_at_least, check_common, default_run_name, log_configuration, run_tags
from experiments.entry_point import EntryPoint
from experiments.epoch_hooks import log_spectral_estimates
from experiments.metric_logging import log_metrics
from experiments.models import log_pyfunc_model
from experiments.options import ArchitectureOptions, EstimatorOptions, RunOptions
from experiments.tracking import run_page, set_description, tracked_run, write_csv
from pipeline.data.toy import TOY_DATASETS, sample_toy
from pipeline.fields import documented, when
from pipeline.layers.branches import mlp_branch
from pipeline.layers.spectral import SpectralConfig
from pipeline.models import VECTOR_FLOW_PRESETS, FlowModel, VectorFlow
from pipeline.models.base import n_parameters
from pipeline.models.glow import matched_glow
from pipeline.plotting import new_figure, save_figure
from pipeline.training.device import check_device_name, deterministic_algorithms, resolve_device
from pipeline.training.loop import LoopConfig, LoopState, fit
from pipeline.transforms import ExactLogDet, InvertibleResidualBlock

log = logging.getLogger("experiments.toy")

EXACT = ExactLogDet()  # evaluation: the exact 2-D log-det, whatever estimator trained the model


@dataclass(frozen=True)
class ToyOptions:
    """What the toy run trains and draws: datasets, models, steps, the density grid, the 1-D dynamics of Fig. 1."""

    GROUP: ClassVar[str] = "toy"
    datasets: str = documented("8gaussians", "comma-separated toy datasets (pipeline.data.toy), or all")
    models: str = documented("glow,iresnet", "comma-separated models of TOY_MODELS: glow, iresnet")
    steps: int = documented(2000, "optimizer steps per model and dataset (>= 1)")
    steps_per_epoch: int = documented(250, "steps between checkpoints and epoch metrics (>= 1)")
    batch_size: int = documented(256, "points per optimizer step (>= 1)")
    lr: float = documented(1e-3, "Adam's learning rate (> 0)")
    n_test: int = documented(5000, "test points per dataset, scored with the exact log-det (>= 1)")
    grid_size: int = documented(150, "points per side of the density grid of Fig. 2 (>= 2)")
    grid_limit: float = documented(4.5, "the density grid spans [-limit, limit] on both axes (> 0)")
    n_samples: int = documented(2000, "samples drawn from each trained model (>= 1)")
    dynamics: bool = documented(True, "also train the 1-D ResNet and i-ResNet of Fig. 1")
    dynamics_depth: int = documented(
        10, "blocks of the 1-D networks of Fig. 1 (even, >= 2)", applies=when("dynamics", True)
    )
    dynamics_steps: int = documented(3000, "training steps of each 1-D network (>= 1)", applies=when("dynamics", True))


@dataclass(frozen=True)
class ToyConfig(ToyOptions, EstimatorOptions, ArchitectureOptions, RunOptions):
    """The toy run. The i-ResNet is the vector-flow preset ``architecture`` (Glow is matched to it in depth and
    parameters) with any :class:`~pipeline.models.VectorFlowArchitecture` field replaced; its training log-det
    options are :class:`~experiments.config.EstimatorOptions`.

    Test NLLs and plotted densities always use the exact 2-D log-det, whatever the training estimator.
    """

    ARCHITECTURES: ClassVar = VECTOR_FLOW_PRESETS
    FROM_DATA: ClassVar = ("dim",)
    preset: str = documented("quick", "the entry point's preset (PRESETS)")

    def dataset_names(self) -> list[str]:
        names = sorted(TOY_DATASETS) if self.datasets == "all" else [n.strip() for n in self.datasets.split(",")]
        unknown = [n for n in names if n not in TOY_DATASETS]
        if unknown or not names:
            raise ValueError(f"unknown toy dataset(s) {unknown}; choose from {sorted(TOY_DATASETS)} or 'all'")
        return names

    def model_names(self) -> list[str]:
        names = [n.strip() for n in self.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in TOY_MODELS]
        if unknown or not names:
            raise ValueError(f"unknown toy model(s) {unknown}; choose from {sorted(TOY_MODELS)}")
        return names

    def __post_init__(self) -> None:
        check_common(self)
        self.training_estimator()  # the library validates every estimator option
        self.dataset_names()
        self.model_names()
        names = ("steps", "steps_per_epoch", "batch_size", "n_test", "grid_size", "n_samples", "dynamics_depth")
        check_at_least(self, 1, (*names, "dynamics_steps"))
        check_device_name(self.device)
        if self.dynamics_depth % 2:
            raise ValueError("dynamics_depth must be even (the x^3 target sits at half depth)")
        if self.grid_size < 2:  # the density grid's cell area is its spacing squared: one point has none
            raise ValueError(f"grid_size must be >= 2, got {self.grid_size}")
        if not self.lr > 0 or not self.grid_limit > 0:
            raise ValueError("lr and grid_limit must be > 0")
        self.resolved_architecture(dim=2)  # the library validates c, widths, ...


def _iresnet(cfg: ToyConfig) -> FlowModel:
    return VectorFlow(cfg.resolved_architecture(dim=2), estimator=cfg.training_estimator())


TOY_MODELS: dict[str, Callable[[ToyConfig], FlowModel]] = {
    "iresnet": _iresnet,
    "glow": lambda cfg: matched_glow(_iresnet(cfg)),
}

_EXACT = dict(estimator="exact")  # brute force is cheap in 2-D (the paper); any estimator can train instead
PRESETS: dict[str, dict] = {
    "quick": _EXACT,
    "all": dict(_EXACT, datasets="all", steps=1500),
    "paper": dict(
        _EXACT,
        datasets="all",
        architecture="paper",
        steps=10000,
        steps_per_epoch=1000,
        dynamics_depth=20,
        dynamics_steps=4000,
    ),
}


# --- densities ----------------------------------------------------------------------------------
def density_grid(model: FlowModel, limit: float, size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``(coords, density)``: the model's density on a ``size x size`` grid over ``[-limit, limit]^2``."""
    coords = torch.linspace(-limit, limit, size, device=device)
    xx, yy = torch.meshgrid(coords, coords, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    model.eval()
    with torch.no_grad(), model.estimator(EXACT):
        log_p = torch.cat([model.log_prob(chunk) for chunk in points.split(4096)])
    return coords.cpu().numpy(), log_p.exp().reshape(size, size).cpu().numpy()


def grid_mass(coords: np.ndarray, density: np.ndarray) -> float:
    """Riemann sum of the density over the grid (close to 1 when the grid covers the mass)."""
    step = float(coords[1] - coords[0])
    return float(density.sum() * step * step)


def train_toy_model(
    model: FlowModel, dataset: str, cfg: ToyConfig, device: torch.device, prefix: str, checkpoint: Path
) -> tuple[FlowModel, int]:
    """Train ``model`` on ``dataset``, its metrics under ``prefix`` (``8gaussians/glow/train/nll_nats``); returns the
    model (in evaluation mode) and the optimizer steps it took."""
    model.to(device)
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        model(sample_toy(dataset, 1024, seed=cfg.seed + 7).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epochs = math.ceil(cfg.steps / cfg.steps_per_epoch)

    def batches(epoch: int):
        base = (cfg.seed * 1_000_003 + epoch) * cfg.steps_per_epoch
        for i in range(cfg.steps_per_epoch):
            yield (sample_toy(dataset, cfg.batch_size, seed=base + i).to(device),)

    def step_fn(batch):
        nll = -model.log_prob(batch[0]).mean()
        return nll, {}

    loop = LoopConfig(
        log_metrics=log_metrics,
        epochs=epochs,
        checkpoint_path=checkpoint,
        log_every=50,
        progress=cfg.progress,
        metric_prefix=prefix,
        loss_name="nll_nats",
    )
    state = LoopState()
    fit(
        model,
        optimizer,
        None,
        batches,
        step_fn,
        loop,
        state=state,
        on_epoch_end=lambda epoch, _: log_spectral_estimates(model, epoch, state.step, prefix=prefix),
    )
    return model.eval(), state.step


# --- Fig. 1: 1-D dynamics -----------------------------------------------------------------------
class Residual1D(nn.Module):
    """A stack of 1-D residual blocks whose intermediate states are returned (for the trajectories)."""

    def __init__(self, depth: int, coeff: float | None) -> None:
        super().__init__()
        spectral = None if coeff is None else SpectralConfig(coeff=coeff, n_power_iterations=5)  # None: vanilla
        self.blocks = nn.ModuleList(
            InvertibleResidualBlock(mlp_branch(1, (32, 32), spectral=spectral)) for _ in range(depth)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        states = [x]
        for block in cast("list[InvertibleResidualBlock]", self.blocks):
            states.append(block.map(states[-1]))
        return states


def count_crossings(states: list[Tensor]) -> int:
    """Pairs of trajectories whose order flips between consecutive depths (= path crossings)."""
    total = 0
    for a, b in zip(states[:-1], states[1:], strict=True):
        da = a.reshape(-1, 1) - a.reshape(1, -1)
        db = b.reshape(-1, 1) - b.reshape(1, -1)
        total += int(((da * db) < 0).triu(1).sum())
    return total


def train_dynamics(coeff: float | None, cfg: ToyConfig, device: torch.device) -> tuple[Residual1D, Tensor]:
    # the plotted inputs are the training inputs: out-of-order noisy targets can only be met by crossing paths
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.linspace(-2, 2, 41).reshape(-1, 1)
    cube = x**3 + 0.5 * torch.randn(x.shape, generator=generator)
    identity = x + 0.1 * torch.randn(x.shape, generator=generator)
    x, cube, identity = x.to(device), cube.to(device), identity.to(device)
    torch.manual_seed(cfg.seed)
    net = Residual1D(cfg.dynamics_depth, coeff).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(cfg.dynamics_steps):
        states = net(x)
        loss = ((states[len(states) // 2] - cube) ** 2).mean() + ((states[-1] - identity) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    return net, x


def _dynamics_figure(cfg: ToyConfig, device: torch.device, out: Path) -> dict[str, float]:
    fig, axes = new_figure(10, 4)
    axes.remove()
    metrics: dict[str, float] = {}
    for i, (name, coeff) in enumerate((("ResNet", None), ("i-ResNet", cfg.architecture_option("coeff")))):
        net, inputs = train_dynamics(coeff, cfg, device)
        with torch.no_grad():
            states = net(inputs)
        crossings = count_crossings(states)
        metrics[f"dynamics/crossings_{name.lower().replace('-', '')}"] = crossings
        ax = fig.add_subplot(1, 2, i + 1)
        paths = torch.cat(states, dim=1).cpu().numpy()
        for path in paths:
            ax.plot(range(len(states)), path, linewidth=0.8)
        ax.axvline(len(states) // 2, color="k", linewidth=0.5, linestyle=":")
        ax.set_title(f"{name}: {crossings} crossings")
        ax.set_xlabel("depth (block)")
    save_figure(fig, out / "fig1_dynamics.png")
    return metrics


# --- the run ------------------------------------------------------------------------------------
def _train_and_score(
    cfg: ToyConfig, dataset: str, name: str, test: Tensor, device: torch.device, checkpoint: Path, out: Path
) -> tuple[dict, tuple[np.ndarray, np.ndarray, float]]:
    """Train model ``name`` on ``dataset``; its exact test NLL, density grid (saved) and samples' figure."""
    torch.manual_seed(cfg.seed)
    prefix = f"{dataset}/{name}/"
    model, steps = train_toy_model(TOY_MODELS[name](cfg), dataset, cfg, device, prefix, checkpoint)
    with torch.no_grad(), model.estimator(EXACT):
        nll = float(-model.log_prob(test).mean())
        samples = model.sample(cfg.n_samples).cpu().numpy()
    coords, density = density_grid(model, cfg.grid_limit, cfg.grid_size, device)
    mass = grid_mass(coords, density)
    # the model as an MLflow Model of the run (the i-ResNet and the Glow baseline alike), with its test scores. A run
    # holds several models on one step axis: each is linked to its own scores, none by step (MLflow would link the
    # other models' metrics at the same step to it), hence its output at step 0
    log_pyfunc_model(
        model.cpu(),
        "toy",
        {"dataset": dataset},
        test[:2].cpu().numpy().astype(np.float32),
        name=f"{dataset}-{name}",
        register_as=f"{cfg.register_model}-{dataset}-{name}" if cfg.register_model else None,
        results={f"{prefix}test/nll_nats": nll, f"{prefix}test/grid_mass": mass},
        results_step=steps,
    )
    model.to(device)
    np.save(out / f"density_{dataset}_{name}.npy", density)
    fig, ax = new_figure(4, 4)
    ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5)
    ax.set_xlim(-cfg.grid_limit, cfg.grid_limit)
    ax.set_ylim(-cfg.grid_limit, cfg.grid_limit)
    ax.set_title(f"{name} samples: {dataset}")
    save_figure(fig, out / f"samples_{dataset}_{name}.png")
    row = {
        "dataset": dataset,
        "model": name,
        "test_nll_nats": nll,
        "grid_mass": mass,
        "n_parameters": n_parameters(model),
    }
    return row, (coords, density, nll)


def _density_panels(fig, cfg: ToyConfig, row: int, n_rows: int, dataset: str, panels: list) -> None:
    """One row of Fig. 2: the data's histogram, then each model's density with its test NLL."""
    data = sample_toy(dataset, 20_000, seed=cfg.seed + 20_000).numpy()
    n_cols = 1 + len(panels)
    ax = fig.add_subplot(n_rows, n_cols, row * n_cols + 1)
    ax.hist2d(data[:, 0], data[:, 1], bins=cfg.grid_size, range=[[-cfg.grid_limit, cfg.grid_limit]] * 2)
    ax.set_title(f"{dataset}: data")
    axes = [ax]
    for c, (name, (coords, density, nll)) in enumerate(panels):
        ax = fig.add_subplot(n_rows, n_cols, row * n_cols + c + 2)
        ax.pcolormesh(coords, coords, density, shading="auto")
        ax.set_title(f"{name}: NLL {nll:.3f}")
        axes.append(ax)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")


def run(cfg: ToyConfig) -> str:
    device = resolve_device(cfg.device)
    datasets, model_names = cfg.dataset_names(), cfg.model_names()
    with (
        deterministic_algorithms(cfg.deterministic),
        tracked_run(
            cfg.experiment_name or "toy",
            run_name=cfg.run_name or default_run_name(cfg),
            log_system_metrics=cfg.log_system_metrics,
            tags=run_tags(cfg),
        ) as active,
        tempfile.TemporaryDirectory() as tmp,
    ):
        run_id, out = active.info.run_id, Path(tmp)
        log.info("follow it in the MLflow UI: %s", run_page(mlflow.get_run(run_id)))
        set_description(run_id, f"Training {', '.join(model_names)} on {', '.join(datasets)} ...")
        log_configuration(cfg, cfg.resolved_architecture(dim=2))
        rows = []
        fig, axes = new_figure(3.2 * (1 + len(model_names)), 3.2 * len(datasets))
        axes.remove()
        for r, dataset in enumerate(datasets):
            test = sample_toy(dataset, cfg.n_test, seed=cfg.seed + 10_000 + r)
            mlflow.log_input(from_numpy(test.numpy(), name=f"{dataset}-test"), context="test")
            test = test.to(device)
            panels = []
            for name in model_names:
                checkpoint = Path(cfg.checkpoint_dir) / run_id / f"{dataset}-{name}.pt"
                row, panel = _train_and_score(cfg, dataset, name, test, device, checkpoint, out)
                rows.append(row)
                panels.append((name, panel))
            _density_panels(fig, cfg, r, len(datasets), dataset, panels)
        save_figure(fig, out / "fig2_densities.png")
        write_csv(rows, out / "test_nll.csv")
        if cfg.dynamics:
            log_metrics(_dynamics_figure(cfg, device, out), 0)
        mlflow.log_artifacts(str(out))
        scores = "; ".join(f"{row['dataset']} {row['model']} {row['test_nll_nats']:.3f}" for row in rows)
        set_description(run_id, f"**test NLL (nats)**: {scores} (test_nll.csv, fig2_densities.png)")
        return run_id


# --- command line -------------------------------------------------------------------------------
ENTRY = EntryPoint(ToyConfig, PRESETS, run, __doc__)
config_from_preset, main = ENTRY.config_from_preset, ENTRY.main

if __name__ == "__main__":
    sys.exit(main())
