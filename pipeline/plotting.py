"""Figure helpers (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save images with values in [0, 1] as one PNG grid."""
    from torchvision.utils import save_image

    save_image(images.detach().float().clamp(0, 1).cpu(), path, nrow=nrow, padding=1)


def new_figure(width: float = 6.0, height: float = 4.0):
    return plt.subplots(figsize=(width, height))


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
