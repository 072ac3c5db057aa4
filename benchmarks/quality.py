"""Quality per CPU second: this flow against the best flows, on the main job's data, in one run.

    pip install -e '.[bench]'                      # the peers, pinned
    python -m benchmarks.quality                   # every contender, 1x and 2x a 174 CPU-s budget
    python -m benchmarks.quality --budget 60 --contenders iresnet glow --json quality.json
    python -m benchmarks.quality --contenders iresnet --set lr=1e-2 --set coeff=0.97   # one lever

Every contender trains on the same split of the embedded digits (``digits-mnist5k``: 4,000 train,
1,000 test, 28x28, 256 levels), the same dequantisation and batches of 64 (an i-ResNet setting may
choose its own), in its own process with **one thread**, for equal *training* CPU seconds
(``time.process_time``, evaluation excluded), and is scored on the 1,000 test digits with the project's
own :func:`pipeline.metrics.bits_per_dim`. Each budget (``--budget`` times each of ``--multiples``, 1x and
2x by default) is its own training from the same seed, so a schedule that decays over the budget
(``--set lr_schedule=cosine``) ends at it; a constant schedule gives the same result as stopping one
longer run at the mark.

* ``iresnet``: this project's :class:`~pipeline.models.IResNetFlow` with the main job's ``quick`` preset
  (``experiments.density``; the budget replaces its ``epochs``) and ``--set`` on top, scored by the
  pipeline's honest protocol (:func:`pipeline.evaluation.evaluate_bits_per_dim`: Theorem-3 series or
  unbiased roulette, to the standard-error target; the JSON has its standard error and bias bound).
* ``glow``: normflows' multi-scale Glow (``GlowBlock``: affine coupling, invertible 1x1 convolution,
  ActNorm), L levels of K blocks with ``h`` hidden channels; exact log-det. ``--peer-set logit_alpha=...``
  puts normflows' logit transform first (as its Glow example does), to compare with ``--set logit_alpha=...``.
* ``realnvp``: the same multi-scale frame from normflows parts with RealNVP's steps (affine coupling
  with an ``exp`` scale, a fixed channel swap, ActNorm); exact log-det.
* ``residual``: normflows' ``Residual`` (Residual Flows' code): LipSwish CNN branches (3-1-3,
  Lipschitz 0.97), ActNorm, unbiased roulette in training; scored with its own (unbiased, stochastic)
  evaluation-mode estimate, averaged over 3 passes.

Before training, each contender's log-det is checked against brute force (the full Jacobian of its
forward map on 2 test images, ``slogdet``), as :mod:`benchmarks.peers` does: the ``ld err`` column.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import emit, in_fresh_process
from pipeline.data import ImageSplit, dequantize, load_dataset
from pipeline.logging_setup import setup_logging
from pipeline.metrics import bits_per_dim

log = logging.getLogger("benchmarks.quality")

DATASET = "digits-mnist5k"
N_LEVELS = 256
CONTENDERS = ("iresnet", "glow", "realnvp", "residual")


@dataclass
class Contender:
    """What the harness needs from a model: a training loss, a test score and a log-det check."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[Tensor], Tensor]  # mean training bits/dim of a dequantised batch
    score: Callable[[ImageSplit], dict]  # {"bpd": ...} on the test split (and protocol details)
    forward_logdet: Callable[[Tensor], tuple[Tensor, Tensor]]  # x -> (flat z, log-det) for the brute-force check
    batch_size: int | None = None  # its own batch size (the i-ResNet preset's); None: --batch-size
    sample: Callable[[int], Tensor] | None = None  # n samples at temperature 1, in [-1/2, 1/2)
    after_step: Callable[[], None] = lambda: None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    grad_clip: float = 0.0


def _in_eval_mode(model: nn.Module, draw: Callable[[], Tensor]) -> Tensor:
    """``draw()`` with ``model`` in evaluation mode and without a graph; training mode again afterwards."""
    model.eval()
    try:
        with torch.no_grad():
            return draw()
    finally:
        model.train()


# --- this project's flow --------------------------------------------------------------------------
def _iresnet(settings: dict, train_x: Tensor, clock: dict) -> Contender:
    from experiments.density import DensityConfig, config_from_preset
    from pipeline.evaluation import evaluate_bits_per_dim
    from pipeline.models import IResNetFlow
    from pipeline.training.schedule import cosine_factor, linear_warmup
    from pipeline.transforms import ExactLogDet

    known = {f.name for f in fields(DensityConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown density settings {unknown}")
    cfg = config_from_preset("quick", **{"progress": False, **settings})  # the main job's settings, then --set
    model = IResNetFlow(cfg.flow_architecture((1, 28, 28)), estimator=cfg.training_estimator())
    with torch.no_grad():
        model(train_x[:512])  # ActNorm's data-dependent initialisation, as the main job does
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
    warmup = linear_warmup(cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":  # the main job decays over its steps; here over the CPU budget
        factor = lambda step: warmup(step) * cosine_factor(clock["progress"], cfg.lr_final_fraction)  # noqa: E731
    else:
        factor = warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def loss(x: Tensor) -> Tensor:
        zs, logdet = model(x)
        return bits_per_dim(model.prior_log_prob(zs) + logdet, model.dim, N_LEVELS).mean()

    def score(split: ImageSplit) -> dict:  # its own dequantisation (seeded), as the main job scores
        est = evaluate_bits_per_dim(
            model, split, n_levels=N_LEVELS, batch_size=cfg.eval_batch_size, protocol=cfg.protocol(), progress=False
        )
        return {
            "bpd": est.bpd,
            "se": est.standard_error,
            "bias_bound": est.bias_bound,
            "estimator": est.estimator,
            "terms": est.n_terms,
            "passes": est.n_passes,
            "converged": est.converged,
        }

    def forward_logdet(x: Tensor) -> tuple[Tensor, Tensor]:
        with model.estimator(ExactLogDet()):
            zs, logdet = model(x)
        return torch.cat([z.flatten(1) for z in zs], dim=1), logdet

    def sample(n: int) -> Tensor:
        return _in_eval_mode(model, lambda: model.sample(n))

    return Contender(
        model, optimizer, loss, score, forward_logdet, sample=sample, scheduler=scheduler, grad_clip=cfg.grad_clip,
        batch_size=cfg.batch_size,
    )  # fmt: skip


# --- normflows peers ------------------------------------------------------------------------------
def _normflows_multiscale(kind: str, levels: int, blocks: int, hidden: int, logit_alpha: float = 0.0) -> nn.Module:
    import normflows as nf

    flows, merges, priors = [], [], []
    for i in range(levels):
        channels = 2 ** (levels + 1 - i)  # 1 input channel, squeezed (levels - i) times, half factored out
        steps: list[nn.Module] = []
        for _ in range(blocks):
            if kind == "glow":
                steps.append(nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True))
            elif kind == "realnvp":
                net = nf.nets.ConvNet2d([channels // 2, hidden, hidden, channels], [3, 1, 3], 0.0, True)
                steps.append(
                    _step(
                        nf.flows.AffineCouplingBlock(net, scale=True, scale_map="exp", split_mode="channel"),
                        nf.flows.Permute(channels, mode="swap"),
                        nf.flows.ActNorm((channels, 1, 1)),
                    )
                )
            else:  # residual
                net = nf.nets.LipschitzCNN([channels, hidden, hidden, channels], [3, 1, 3], lipschitz_const=0.97)
                steps.append(_step(nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm((channels, 1, 1))))
        steps.append(nf.flows.Squeeze())
        flows.append(steps)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (2 ** (levels - i), 28 // 2 ** (levels - i), 28 // 2 ** (levels - i))
        else:
            latent = (2 ** (levels + 1), 28 // 2**levels, 28 // 2**levels)
        priors.append(nf.distributions.DiagGaussian(latent))
    # the logit transform as normflows' Glow example applies it (its ``transform``), on our data range [-1/2, 1/2)
    logit = [nf.transforms.Logit(logit_alpha), _HalfShift()] if logit_alpha else None
    transform = nf.flows.Composite(logit) if logit else None
    return nf.MultiscaleFlow(priors, flows, merges, transform=transform, class_cond=False)


class _HalfShift(nn.Module):
    """Data in [0, 1] (normflows' ``Logit``) -> [-1/2, 1/2) (ours); ``nf.transforms.Shift`` shifts in place,
    which would change the caller's batch."""

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z - 0.5, z.new_zeros(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + 0.5, x.new_zeros(x.shape[0])


def _step(*flows: nn.Module) -> nn.Module:
    """normflows flows composed as one step whose log-det has the batch's shape (as ``GlowBlock`` does)."""
    import normflows as nf

    class Step(nf.flows.Flow):
        def __init__(self) -> None:
            super().__init__()
            self.flows = nn.ModuleList(flows)

        def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
            total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
            for flow in self.flows:
                z, log_det = flow(z)
                total = total + log_det
            return z, total

        def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
            total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
            for flow in reversed(self.flows):
                z, log_det = flow.inverse(z)
                total = total + log_det
            return z, total

    return Step()


def _normflows(kind: str, settings: dict, train_x: Tensor) -> Contender:
    levels, blocks = int(settings.get("levels", 2)), int(settings.get("blocks", 4))
    hidden = int(settings.get("hidden", 32))
    lr = float(settings.get("lr", 1e-3))
    model = _normflows_multiscale(kind, levels, blocks, hidden, float(settings.get("logit_alpha", 0.0)))
    with torch.no_grad():
        model.log_prob(train_x[:512], None)  # ActNorm's data-dependent initialisation
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    dim = 28 * 28

    def loss(x: Tensor) -> Tensor:
        return bits_per_dim(model.log_prob(x, None), dim, N_LEVELS).mean()

    @torch.no_grad()
    def score(test: ImageSplit) -> dict:
        test_x = dequantize(test.images, N_LEVELS, generator=torch.Generator().manual_seed(1234))
        model.eval()
        passes = 3 if kind == "residual" else 1  # the residual flow's evaluation is a stochastic estimate
        per_pass = []
        for _ in range(passes):
            with torch.enable_grad() if kind == "residual" else torch.no_grad():
                lp = torch.cat([model.log_prob(x, None).detach() for x in test_x.split(250)])
            per_pass.append(bits_per_dim(lp, dim, N_LEVELS).mean().item())
        model.train()
        mean = sum(per_pass) / passes
        se = math.sqrt(sum((p - mean) ** 2 for p in per_pass) / (passes - 1) / passes) if passes > 1 else 0.0
        return {
            "bpd": mean,
            "se": se,
            "bias_bound": 0.0,
            "estimator": "exact" if passes == 1 else "roulette",
            "terms": 0,
            "passes": passes,
            "converged": True,
        }

    def forward_logdet(x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros(len(x), dtype=x.dtype)
        zs = []
        h = x
        if model.transform is not None:
            h, ld = model.transform.inverse(h)
            log_det = log_det + ld
        for i in range(model.num_levels - 1, -1, -1):  # as MultiscaleFlow.inverse_and_log_det
            for flow in reversed(model.flows[i]):
                h, ld = flow.inverse(h)
                log_det = log_det + ld
            if i > 0:
                h, ld = model.merges[i - 1].inverse(h)
                log_det = log_det + ld
                z_, h = h
                zs.append(z_)
        zs.append(h)
        return torch.cat([z.flatten(1) for z in zs], dim=1), log_det

    def sample(n: int) -> Tensor:
        return _in_eval_mode(model, lambda: model.sample(n)[0])  # normflows returns (x, log q)

    after = (lambda: nf_update_lipschitz(model)) if kind == "residual" else (lambda: None)
    return Contender(model, optimizer, loss, score, forward_logdet, sample=sample, after_step=after)


def nf_update_lipschitz(model: nn.Module) -> None:
    import normflows as nf

    nf.utils.update_lipschitz(model, 5)


def _brute_force_logdet_error(contender: Contender, x: Tensor) -> float:
    """Largest |log-det - slogdet(full Jacobian)| over the images in ``x`` (nats), in evaluation mode."""
    contender.model.eval()
    errors = []
    for xi in x:
        xi = xi.unsqueeze(0)
        jac = torch.autograd.functional.jacobian(lambda v: contender.forward_logdet(v)[0].squeeze(0), xi)
        exact = torch.linalg.slogdet(jac.reshape(jac.shape[0], -1).double()).logabsdet
        with torch.enable_grad():
            _, logdet = contender.forward_logdet(xi)
        errors.append(abs(float(logdet.detach()) - float(exact)))
    contender.model.train()
    return max(errors)


# --- the harness ------------------------------------------------------------------------------------
def _measure(name: str, settings: dict, args: dict, budget: float, queue) -> None:
    torch.set_num_threads(1)
    setup_logging()
    try:
        queue.put(_train_and_score(name, settings, args, budget))
    except Exception as exc:
        log.exception("%s failed", name)
        queue.put({"contender": name, "settings": settings, "error": f"{type(exc).__name__}: {exc}"})


def _train_and_score(name: str, settings: dict, args: dict, budget: float) -> dict:
    """Train for ``budget`` CPU seconds (its own horizon: a decaying schedule ends at the budget), then score."""
    from pipeline.training.numerics import flush_denormals

    flush_denormals()
    torch.manual_seed(args["seed"])
    data = load_dataset(DATASET)
    gen = torch.Generator().manual_seed(args["seed"])
    train_x = dequantize(data.train.images, N_LEVELS, generator=gen)
    test_x = dequantize(data.test.images, N_LEVELS, generator=torch.Generator().manual_seed(1234))
    clock = {"progress": 0.0}  # fraction of the budget spent, for schedules that decay over it
    contender = _iresnet(settings, train_x, clock) if name == "iresnet" else _normflows(name, settings, train_x)
    ld_error = _brute_force_logdet_error(contender, test_x[:2])
    cpu, steps = 0.0, 0
    batch = contender.batch_size or args["batch_size"]  # the i-ResNet preset (or --set) chooses its own
    while cpu < budget:
        order = torch.randperm(len(data.train), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            start = time.process_time()
            x = dequantize(data.train.images[order[i : i + batch]], N_LEVELS, generator=gen)
            loss = contender.loss(x)
            contender.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if contender.grad_clip:
                torch.nn.utils.clip_grad_norm_(contender.model.parameters(), contender.grad_clip)
            contender.optimizer.step()
            if contender.scheduler is not None:
                contender.scheduler.step()
            contender.after_step()
            cpu += time.process_time() - start
            clock["progress"] = cpu / budget
            steps += 1
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite training loss at step {steps}")
            if cpu >= budget:
                break
    start = time.process_time()
    test = data.test.subset(torch.arange(args["test_images"])) if args.get("test_images") else data.test
    scored = contender.score(test)
    row = {
        "contender": name,
        "settings": settings,
        "budget_s": budget,
        "train_cpu_s": cpu,
        "steps": steps,
        "epochs": steps * batch / len(data.train),
        "train_bpd": loss.item(),
        "eval_cpu_s": time.process_time() - start,
        "logdet_check_error_nats": ld_error,
        "n_parameters": sum(p.numel() for p in contender.model.parameters()),
        **scored,
    }
    if args.get("samples_dir") and contender.sample is not None:  # to judge by eye, same seed for every contender
        from pipeline.plotting import save_image_grid

        torch.manual_seed(args["seed"])
        path = Path(args["samples_dir"]) / f"{name}_{budget:g}s.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(contender.sample(64) + 0.5, path)
        row["samples"] = str(path)
    log.info("%s %s at %.0f CPU-s (%d steps): %.3f bits/dim", name, settings, cpu, steps, scored["bpd"])
    return row


def _parse_settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = tuple(int(v) for v in value.split(",")) if "," in value else value
    return out


def format_table(rows: list[dict], multiples: list[float]) -> str:
    header = f"{'contender':58} {'params':>7} {'ld err':>8} " + " ".join(
        f"{f'bpd@{m:g}x':>9} {'steps':>6} {'eval s':>7}" for m in multiples
    )
    out = [header, "-" * len(header)]
    by_contender: dict[str, list[dict]] = {}
    for r in rows:
        label = r["contender"] + ("".join(f" {k}={v}" for k, v in r["settings"].items()))
        by_contender.setdefault(label, []).append(r)
    for label, per_multiple in by_contender.items():
        failed = next((r for r in per_multiple if "error" in r), None)
        if failed:
            out.append(f"{label[:58]:58} failed: {failed['error']}")
            continue
        first = per_multiple[0]
        cells = " ".join(
            f"{r['bpd']:9.3f}{'' if r['converged'] else '*'} {r['steps']:6d} {r['eval_cpu_s']:7.1f}"
            for r in per_multiple
        )
        out.append(f"{label[:58]:58} {first['n_parameters']:7d} {first['logdet_check_error_nats']:8.1e} {cells}")
    if any(not r.get("converged", True) for r in rows):
        out.append("* evaluation did not reach its tolerances")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--budget", type=float, default=174.0, help="training CPU seconds (one thread) at 1x")
    parser.add_argument("--multiples", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an i-ResNet setting (a DensityConfig field, e.g. lr=1e-2, n_blocks=4,4)",
    )
    parser.add_argument(
        "--peer-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a peer setting: levels, blocks, hidden, lr, logit_alpha (default 2, 4, 32, 1e-3, 0: no logit transform)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=0, help="score on the first N test digits (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--samples-dir", help="also save 64 samples (temperature 1) of each contender here, as PNG")
    args = vars(parser.parse_args(argv))
    if args["budget"] <= 0 or min(args["multiples"]) <= 0:
        parser.error("--budget and --multiples must be > 0")
    setup_logging()
    ours, peers = _parse_settings(args["set"]), _parse_settings(args["peer_set"])
    multiples = sorted(args["multiples"])
    rows = [
        in_fresh_process(_measure, name, ours if name == "iresnet" else peers, args, args["budget"] * m)
        for name in args["contenders"]
        for m in multiples
    ]
    emit(format_table(rows, multiples), args["json"], {"config": args, "results": rows})


if __name__ == "__main__":
    main()
