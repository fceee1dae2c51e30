"""A short self-benchmark of this machine for a run: one inner step's time and one round's payload sizes.

What `potluck plan --auto` and a peer's start-up plan (`potluck peer --plan`) measure before training: a
throwaway copy of the run's model takes a few inner steps on an example batch of its task (random tokens
for a language model; the first step is a warm-up and not timed), and a random update of the model's
shapes goes through the run's upload and download codecs.
"""

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from potluck.protocol.codecs import make_codec
from potluck.protocol.config import RunConfig
from potluck.protocol.density import aggregate_density, start_density
from potluck.tasks import run_task
from potluck.training.diloco import inner_step, make_inner_optimizer

PAYLOAD_SAMPLE_PARAMS = 4_000_000  # encode at most this many parameters' worth of tensors and scale up
DENSITIES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # the upload densities `density_options` tries


@dataclass(frozen=True, kw_only=True, slots=True)
class MachineFigures:
    """What `measure_for_plan` found: the machine's side of `potluck.planning.plan.auto_plan`'s inputs."""

    step_s: float
    tokens_per_step: int
    params: int
    upload_bytes: int
    download_bytes: int
    density_options: dict[float, tuple[int, int]]


def measure_for_plan(cfg: RunConfig, *, device: torch.device, batch_size: int | None = None) -> MachineFigures:
    """Step time, model size and one round's payloads (at the run's density and the others) for this run here."""
    task = run_task(cfg)
    batch_size = batch_size or cfg.inner.batch_size
    options = density_options(cfg)
    own = make_codec(cfg.codec.name, cfg.codec.params).params.get("density")
    upload_bytes, download_bytes = options[own] if own in options else payload_bytes(cfg)  # encoded once
    return MachineFigures(
        step_s=measure_step_seconds(cfg, device=device, batch_size=batch_size),
        tokens_per_step=task.most_work(batch_size=batch_size),
        params=sum(math.prod(shape) for shape in task.parameter_shapes().values()),
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        density_options=options,
    )


def measure_step_seconds(
    cfg: RunConfig, *, device: torch.device, steps: int = 3, batch_size: int | None = None
) -> float:
    """Median wall time of one inner step of the run's model on `device` (after one warm-up step).

    The batch is the run's unless `batch_size` (a peer's own --batch-size) says otherwise.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    task = run_task(cfg)
    model = task.build_model(seed=cfg.seed).to(device)
    optimizer = make_inner_optimizer(model, lr=cfg.inner.lr)
    batch = task.example_batch(batch_size=batch_size or cfg.inner.batch_size, seed=cfg.seed)
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        inner_step(
            model, optimizer, batch, lr=cfg.inner.lr, grad_clip=cfg.inner.grad_clip, loss_of=task.loss
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - started)
    del model, optimizer
    return sorted(times)[len(times) // 2]


def density_options(cfg: RunConfig) -> dict[float, tuple[int, int]]:
    """(upload, download) bytes of one round at each of DENSITIES, for a run whose codecs take a density.

    The aggregate codec's density moves with the upload's, keeping the run's ratio between them (4x by
    default) and at most 1. Empty when the run's codec has no density (fp16, int8, none).
    """
    if not start_density(cfg):
        return {}
    options = {}
    for density in DENSITIES:
        overrides: dict[str, object] = {"codec.params.density": density}
        down_density = aggregate_density(cfg, density)
        if down_density is not None:
            overrides["aggregate_codec.params.density"] = down_density
        options[density] = payload_bytes(cfg.with_overrides(overrides, source="plan"))
    return options


def payload_bytes(cfg: RunConfig) -> tuple[int, int]:
    """(upload, download) bytes of one round: a random update through the run's codec and aggregate codec.

    Tensors are taken in order until PAYLOAD_SAMPLE_PARAMS, and the sizes scaled to the whole model, so
    a 1B-parameter run is estimated in seconds.
    """
    shapes = run_task(cfg).parameter_shapes()
    total = sum(math.prod(shape) for shape in shapes.values())
    sample: dict[str, torch.Tensor] = {}
    sampled = 0
    generator = torch.Generator().manual_seed(cfg.seed)
    for name, shape in shapes.items():
        if sample and sampled >= PAYLOAD_SAMPLE_PARAMS:
            break
        sample[name] = torch.randn(shape, generator=generator) * 1e-3
        sampled += sample[name].numel()
    scale = total / sampled
    return round(_encoded(cfg.codec.name, cfg.codec.params, sample) * scale), round(
        _encoded(cfg.aggregate_codec.name, cfg.aggregate_codec.params, sample) * scale
    )


def _encoded(name: str, params: Mapping[str, object], tensors: dict[str, torch.Tensor]) -> int:
    return len(make_codec(name, params).encode(tensors))
