"""Throughput and memory of the entry points' presets: what a full paper run would cost on this device.

    python -m benchmarks.presets --device cuda                       # every paper preset, float32
    python -m benchmarks.presets --device cuda --amp                 # the same under bfloat16 autocast
    python -m benchmarks.presets --cases density:paper-cifar10 --data-dir ~/data --json presets.json
    python -m benchmarks.presets --cases density:quick classify:quick --steps 4   # CPU-sized

Each case builds the entry point's own training task from its preset (``experiments.density.DensityTask``,
``experiments.classify.ClassifyTask``: the model, estimator, optimizer and schedule a run would use) and trains it
through the library's epoch loop (:func:`pipeline.training.loop.fit`) for two epochs of ``--steps`` batches each,
in a fresh process. The first epoch warms up (cuDNN's algorithm search, the allocator); the table reports the
second: images per second and seconds per step as the loop measures them (``train/images_per_second``), and the
epoch's peak GPU allocation (``gpu_peak_memory_mib``, the metric a tracked run logs; none on a CPU). Evaluation,
checkpoints and artifacts are not timed.

Without ``--data-dir`` the images are uniform random pixels in the preset's dataset's shape (the cost of a step
does not depend on the pixel values); with it, the dataset itself. The last columns project one epoch of the
dataset's full training set and the preset's whole schedule (``epochs``) at that throughput.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import tempfile
from pathlib import Path

import torch

from benchmarks.common import CaseFailed, emit, in_fresh_process
from pipeline.data import ImageDataset, ImageSplit, load_dataset
from pipeline.logging_setup import setup_logging

log = logging.getLogger("benchmarks.presets")

PAPER_CASES = (
    "density:paper-mnist",
    "density:paper-cifar10",
    "classify:paper-mnist",
    "classify:paper-cifar10",
    "classify:paper-cifar100",
)
# the real training sets, for the projections (image shape, classes, training images)
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int, int]] = {
    "digits-mnist5k": ((1, 28, 28), 10, 4000),
    "digits8x8": ((1, 8, 8), 10, 1437),
    "mnist": ((1, 28, 28), 10, 60000),
    "fashion-mnist": ((1, 28, 28), 10, 60000),
    "cifar10": ((3, 32, 32), 10, 50000),
    "cifar100": ((3, 32, 32), 100, 50000),
    "svhn": ((3, 32, 32), 10, 73257),
}


def parse_case(case: str) -> tuple[str, str]:
    """``density:paper-cifar10`` -> (entry point, preset), both checked."""
    entry, sep, preset = case.partition(":")
    if not sep or entry not in ("density", "classify"):
        raise ValueError(f"a case is ENTRY:PRESET with ENTRY density or classify, got {case!r}")
    presets = importlib.import_module(f"experiments.{entry}").PRESETS
    if preset not in presets:
        raise ValueError(f"{entry} has no preset {preset!r}; choose one of {sorted(presets)}")
    return entry, preset


def random_dataset(name: str, n_train: int, seed: int = 0) -> ImageDataset:
    """Uniform random 8-bit images in the shape of dataset ``name`` (a step costs the same on any pixels)."""
    shape, classes, _ = DATASET_SHAPES[name]
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> ImageSplit:
        images = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
        return ImageSplit(images, torch.randint(0, classes, (n,), generator=gen))

    return ImageDataset(name, split(n_train), split(64), n_levels=256, num_classes=classes, source="random")


def _measure(case: str, args: dict, queue) -> None:
    setup_logging()
    try:
        queue.put(measure_case(case, args))
    except Exception as exc:
        log.exception("%s failed", case)
        queue.put({"case": case, "error": f"{type(exc).__name__}: {exc}"})


def measure_case(case: str, args: dict) -> dict:
    """Two epochs of ``args['steps']`` batches through the entry point's task and the library's loop."""
    from experiments.runner import Splits
    from pipeline.data import epoch_batches
    from pipeline.models.base import n_parameters
    from pipeline.training.device import resolve_device, use_deterministic_algorithms
    from pipeline.training.loop import LoopConfig, fit
    from pipeline.training.numerics import flush_denormals

    flush_denormals()
    use_deterministic_algorithms(False)  # as an entry point does by default: cuDNN picks its fastest kernels
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    entry, preset = parse_case(case)
    module = importlib.import_module(f"experiments.{entry}")
    overrides = {"progress": False, "amp": args["amp"], "device": args["device"]}
    if args.get("batch_size"):
        overrides["batch_size"] = args["batch_size"]
    cfg = module.config_from_preset(preset, **overrides)
    device = resolve_device(cfg.device)
    n_train = cfg.batch_size * args["steps"]
    if args.get("data_dir"):
        data = load_dataset(cfg.dataset, args["data_dir"])
        full_train = len(data.train)
        if len(data.train) < n_train:
            raise ValueError(f"{cfg.dataset} has {len(data.train)} training images; {n_train} are needed")
        data = ImageDataset(data.name, data.train.subset(torch.arange(n_train)), data.test, data.n_levels,
                            data.num_classes, data.source)  # fmt: skip
    else:
        data = random_dataset(cfg.dataset, n_train, seed=cfg.seed)
        full_train = DATASET_SHAPES[cfg.dataset][2]
    torch.manual_seed(cfg.seed)
    task_cls = module.DensityTask if entry == "density" else module.ClassifyTask
    task = task_cls(cfg, Splits(data, data.train, None), device)
    with torch.no_grad():
        task.initialize()
    on_device = data.train.to(device) if device.type == "cuda" else data.train  # as the runner keeps them
    epochs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fit(
            task.model,
            task.optimizer,
            task.scheduler,
            epoch_batches(on_device, cfg.batch_size, cfg.seed),
            lambda batch: task.step(task.model, batch),
            LoopConfig(epochs=2, checkpoint_path=Path(tmp) / "last.pt", grad_clip=cfg.grad_clip, amp=cfg.amp,
                       progress=False, log_every=10**9),
            on_epoch_end=lambda epoch, metrics: epochs.__setitem__(epoch, metrics),
        )  # fmt: skip
    timed = epochs[2]
    images_per_s = timed["train/images_per_second"]
    epoch_s = full_train / images_per_s
    return {
        "case": case,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "amp": cfg.amp,
        "batch_size": cfg.batch_size,
        "n_parameters": n_parameters(task.model),
        "estimator": getattr(cfg, "estimator", None),
        "n_terms": getattr(cfg, "n_terms", None),
        "steps_timed": args["steps"],
        "images_per_second": images_per_s,
        "seconds_per_step": cfg.batch_size / images_per_s,
        "gpu_peak_memory_mib": timed.get("train/gpu_peak_memory_mib", float("nan")),
        "train_loss": timed["train/loss_epoch_mean"],
        "full_epoch_minutes": epoch_s / 60,
        "schedule_epochs": cfg.epochs,
        "schedule_hours": epoch_s * cfg.epochs / 3600,
        "data": "random" if not args.get("data_dir") else data.source,
    }


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'case':26} {'amp':>4} {'batch':>5} {'params':>10} {'img/s':>9} {'s/step':>8} {'peak MiB':>9} "
        f"{'epoch min':>9} {'schedule h':>10}"
    )
    out = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['case']:26} failed: {r['error']}")
            continue
        out.append(
            f"{r['case']:26} {'bf16' if r['amp'] else 'no':>4} {r['batch_size']:5d} {r['n_parameters']:10,d} "
            f"{r['images_per_second']:9.1f} {r['seconds_per_step']:8.3f} {r['gpu_peak_memory_mib']:9.0f} "
            f"{r['full_epoch_minutes']:9.2f} {r['schedule_hours']:10.2f}"
        )
    devices = sorted({r["device"] for r in rows if "device" in r})
    out.append(f"device: {', '.join(devices)}; epoch and schedule projected from the timed epoch's throughput")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(PAPER_CASES), metavar="ENTRY:PRESET")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only), as -P amp=true")
    parser.add_argument("--steps", type=int, default=20, help="batches per epoch (two epochs; the second is timed)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: each preset's own")
    parser.add_argument("--data-dir", help="the datasets' folder (default: random images in their shapes)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the default)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case before it is reported dead")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = vars(parser.parse_args(argv))
    if args["steps"] < 1 or args["batch_size"] < 0:
        parser.error("--steps must be >= 1 and --batch-size >= 0")
    try:
        for case in args["cases"]:
            parse_case(case)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging()
    rows = []
    for case in args["cases"]:
        try:
            rows.append(in_fresh_process(_measure, case, args, timeout_s=args["timeout"]))
        except CaseFailed as exc:
            rows.append({"case": case, "error": str(exc)})
        log.info("%s done", case)
    emit(format_table(rows), args["json"], {"config": args, "results": rows})


if __name__ == "__main__":
    main()
