"""Seeded 2-D toy densities (the paper's Fig. 2 and the usual flow benchmarks).

Every generator takes ``(n, rng)`` with a NumPy ``Generator`` and returns an ``(n, 2)`` float array,
roughly inside ``[-4, 4]^2``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angles = rng.integers(0, 8, n) * (np.pi / 4)
    centers = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 2.0 * np.sqrt(2)
    return centers + 0.2 * rng.standard_normal((n, 2))


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - rng.integers(0, 2, n) * 2.0
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2.0


def two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.sqrt(rng.uniform(0, 1, n)) * 540 * (2 * np.pi) / 360
    d1x, d1y = -np.cos(t) * t, np.sin(t) * t
    sign = np.where(rng.uniform(0, 1, n) < 0.5, 1.0, -1.0)
    points = np.stack([d1x, d1y], axis=1) * sign[:, None]
    return points / 3.0 + 0.1 * rng.standard_normal((n, 2))


def moons(n: int, rng: np.random.Generator) -> np.ndarray:
    upper = rng.uniform(0, 1, n) < 0.5
    t = rng.uniform(0, np.pi, n)
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    points = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    return (points - np.array([0.5, 0.25])) * 2.0


def pinwheel(n: int, rng: np.random.Generator, n_arms: int = 5) -> np.ndarray:
    radial_std, tangential_std, rate = 0.3, 0.1, 0.25
    labels = rng.integers(0, n_arms, n)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    angles = 2 * np.pi * labels / n_arms + rate * np.exp(features[:, 0])
    rotations = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], axis=1).reshape(-1, 2, 2)
    return 2.0 * np.einsum("ti,tij->tj", features, rotations)


def rings(n: int, rng: np.random.Generator) -> np.ndarray:
    radius = rng.integers(1, 5, n) * 0.75
    angle = rng.uniform(0, 2 * np.pi, n)
    points = np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius[:, None]
    return points + 0.08 * rng.standard_normal((n, 2))


def circles(n: int, rng: np.random.Generator) -> np.ndarray:
    radius = np.where(rng.uniform(0, 1, n) < 0.5, 1.0, 2.5)
    angle = rng.uniform(0, 2 * np.pi, n)
    points = np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius[:, None]
    return points + 0.1 * rng.standard_normal((n, 2))


def swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
    points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return points / 5.0 + 0.1 * rng.standard_normal((n, 2))


TOY_DATASETS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "2spirals": two_spirals,
    "moons": moons,
    "pinwheel": pinwheel,
    "rings": rings,
    "circles": circles,
    "swissroll": swissroll,
}


def sample_toy(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` points of toy density ``name`` as a float32 tensor, reproducible from ``seed``."""
    try:
        generator = TOY_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {sorted(TOY_DATASETS)}") from None
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.from_numpy(generator(n, np.random.default_rng(seed)).astype(np.float32))
