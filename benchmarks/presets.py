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

from benchmarks.common import CaseFailed, counted_flops, emit, in_fresh_process
from benchmarks.tables import markdown_table
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


def parse_settings(settings: list[str]) -> dict[str, object]:
    """``["gradient=backprop", "n_terms=5"]`` as options (numbers as numbers); each checked by the preset's config."""
    options: dict[str, object] = {}
    for setting in settings:
        name, sep, text = setting.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes OPTION=VALUE, got {setting!r}")
        value: object = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        options[name] = {"true": True, "false": False}.get(text, value)
    return options


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
    from experiments.runner import Splits, compiled_step
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
    overrides = {**args.get("set", {}), "progress": False, "amp": args["amp"], "device": args["device"]}
    overrides["compile"] = args.get("compile", False)
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
    batches = epoch_batches(on_device, cfg.batch_size, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        fit(
            task.model,
            task.optimizer,
            task.scheduler,
            batches,
            compiled_step(task, task.model, cfg.compile),
            LoopConfig(epochs=2, checkpoint_path=Path(tmp) / "last.pt", grad_clip=cfg.grad_clip, amp=cfg.amp,
                       progress=False, log_every=10**9),
            on_epoch_end=lambda epoch, metrics: epochs.__setitem__(epoch, metrics),
        )  # fmt: skip
    timed = epochs[2]
    images_per_s = timed["train/images_per_second"]
    epoch_s = full_train / images_per_s
    batch = next(iter(batches(0)))  # the step's arithmetic, counted in eager mode (the same operations compiled)
    flops_per_image = counted_flops(lambda: task.step(task.model, batch)[0].backward()) / cfg.batch_size
    task.optimizer.zero_grad(set_to_none=True)
    return {
        "case": case,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "amp": cfg.amp,
        "compile": cfg.compile,
        "set": args.get("set", {}),
        "train_gflop_per_image": flops_per_image / 1e9,
        "achieved_tflop_per_s": flops_per_image * images_per_s / 1e12,
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
    """The cases as a markdown table; a case that failed says why."""
    header = ("case", "precision", "step", "batch", "parameters", "images/s", "s/step", "peak GPU MiB",
              "GFLOP/image", "TFLOP/s", "one epoch, min", "schedule, h")  # fmt: skip
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["case"], f"failed: {r['error']}", *[""] * (len(header) - 2)))
            continue
        table.append(
            (
                r["case"] + "".join(f" {k}={v}" for k, v in r.get("set", {}).items()),
                "bf16 autocast" if r["amp"] else "float32",
                "compiled" if r.get("compile") else "eager",
                r["batch_size"],
                f"{r['n_parameters']:,}",
                f"{r['images_per_second']:.1f}",
                f"{r['seconds_per_step']:.3f}",
                f"{r['gpu_peak_memory_mib']:.0f}",
                f"{r['train_gflop_per_image']:.2f}",
                f"{r['achieved_tflop_per_s']:.3f}",
                f"{r['full_epoch_minutes']:.2f}",
                f"{r['schedule_hours']:.2f}",
            )
        )
    devices = sorted({r["device"] for r in rows if "device" in r})
    note = f"\ndevice: {', '.join(devices)}; epoch and schedule projected from the timed epoch's throughput\n"
    return markdown_table(header, table) + note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(PAPER_CASES), metavar="ENTRY:PRESET")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only), as -P amp=true")
    parser.add_argument(
        "--compile", action="store_true", help="the training step through torch.compile, as -P compile=true"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="OPTION=VALUE", help="options on top of each preset (gradient=backprop)"
    )
    parser.add_argument("--steps", type=int, default=20, help="batches per epoch (two epochs; the second is timed)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: each preset's own")
    parser.add_argument("--data-dir", help="the datasets' folder (default: random images in their shapes)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the default)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case before it is reported dead")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = vars(parser.parse_args(argv))
    try:
        args["set"] = parse_settings(args["set"])
    except ValueError as exc:
        parser.error(str(exc))
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
