"""The DiLoCo algorithm in one process, side by side with a DDP baseline, with no network.

`potluck simulate` answers the question every codec and hyperparameter change raises: how much
upload does it save against data-parallel training, and what does it cost in held-out loss at
equal tokens? Simulated peers run one after another; the "aggregator" is a function call; the
bytes counted are the real signed wire messages (envelope header + codec payload) a peer would
send, so the reduction factors are the ones the swarm would see.

Both arms train in bf16 autocast on a CUDA GPU that supports it (fp32 on CPU) and evaluate in
fp32, so their losses compare exactly.

Equal tokens: DDP step t trains on the concatenation of the P peers' batches at their step t, so
both arms see exactly the same tokens in the same order per peer, with the same inner optimizer
and learning-rate schedule.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.codecs import Codec, make_codec
from potluck.protocol.codecs.aggregate import encode_aggregate
from potluck.protocol.config import RunConfig, config_hash
from potluck.protocol.envelope import UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity, generate_identity
from potluck.tasks import Batch, Task, run_task
from potluck.training.combine import weighted_mean
from potluck.training.device import batch_to
from potluck.training.diloco import (
    OuterOptimizer,
    inner_lr,
    inner_step,
    load_params,
    make_inner_optimizer,
    pseudo_gradient,
    snapshot,
)
from potluck.training.evaluate import evaluate

logger = logging.getLogger(__name__)

# Called as on_progress(arm_name, inner_steps_done, inner_steps_total) after every inner step.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(kw_only=True, slots=True)
class ArmResult:
    """What one arm (DDP or one codec) achieved and what it cost on the wire."""

    name: str
    val_loss: float
    gap_pct: float = 0.0  # (val_loss - ddp_val_loss) / ddp_val_loss * 100
    upload_bytes_per_peer_per_step: float
    upload_bytes_per_param_per_kstep: float  # per peer, per 1000 inner steps
    download_bytes_per_param_per_round: float
    reduction_vs_ddp: float = 1.0  # DDP ring all-reduce bytes per step / this arm's upload bytes per step
    val_loss_per_round: list[float] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass(kw_only=True, slots=True)
class SimulationResult:
    """Every arm of one simulation, with the settings that produced it."""

    initial_val_loss: float
    num_params: int
    peers: int
    rounds: int
    local_steps: int
    tokens_per_arm: int
    outer: str
    config_hash: str
    arms: list[ArmResult]

    def to_dict(self) -> dict[str, object]:
        """The `--json` object: plain values only."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WarmStart:
    """Where an arm starts instead of a fresh model: a data-parallel checkpoint `steps` inner steps into the same
    schedule, on the same streams (as DiLoCo and INTELLECT-1 start from one); the arm trains the steps left."""

    params: dict[str, torch.Tensor]
    steps: int
    optimizer_state: dict[str, Any]  # the DDP arm's AdamW goes on with it; DiLoCo's workers start their own


@dataclass(frozen=True, slots=True)
class Dropout:
    """Peers leaving mid-run: from round `at_round` on only the first `peers_left` train, and the run goes on for
    `extra_rounds` past its plan (at the schedule's floor learning rate), e.g. until its tokens match an undisturbed
    run's."""

    at_round: int
    peers_left: int
    extra_rounds: int = 0


def parse_arm(text: str) -> tuple[str, str, dict[str, int | float | str | bool]]:
    """``"dct-topk:density=0.03:bits=4"`` -> (arm label, codec name, params); numbers and booleans are typed.

    Raises ValueError with the offending part; the codec itself validates names and values.
    """
    name, *assignments = text.strip().split(":")
    params: dict[str, int | float | str | bool] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key or not raw:
            raise ValueError(f"codec arm {text!r}: expected name:param=value[:param=value], got {assignment!r}")
        params[key] = _typed(raw)
    if not name:
        raise ValueError(f"codec arm {text!r} has no codec name")
    return text.strip(), name, params


def _typed(raw: str) -> int | float | str | bool:
    if raw in ("true", "false"):
        return raw == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def ddp_bytes_per_step(*, num_params: int, peers: int) -> float:
    """Bytes each worker sends per step in a ring all-reduce of fp32 gradients: 2(P-1)/P x 4 x params."""
    return 2 * (peers - 1) / peers * 4 * num_params


def _streams(cfg: RunConfig, task: Task, *, peers: int, skip: int = 0) -> list[Iterator[Batch]]:
    """Each simulated peer's own batches (a seed of its own, as a real peer's key gives it), after its first `skip`
    (those a warm start trained on)."""
    streams = [task.train_batches(seed=cfg.seed + p, batch_size=cfg.inner.batch_size) for p in range(peers)]
    for stream in streams:
        for _ in range(skip):
            next(stream)
    return streams


def _joined(parts: Sequence[Batch]) -> Batch:
    """The peers' batches as one (tensors concatenated along the batch dimension, structure kept)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, dict):
        return {key: _joined([part[key] for part in parts]) for key in first}
    return type(first)(_joined([part[i] for part in parts]) for i in range(len(first)))


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _lr(cfg: RunConfig, step: int) -> float:
    return inner_lr(
        step,
        total_steps=cfg.rounds * cfg.local_steps,
        peak_lr=cfg.inner.lr,
        warmup_steps=cfg.inner.warmup_steps,
        min_lr_ratio=cfg.inner.min_lr_ratio,
    )


def _optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    return make_inner_optimizer(
        model, lr=cfg.inner.lr, betas=(cfg.inner.beta1, cfg.inner.beta2), weight_decay=cfg.inner.weight_decay
    )


def run_ddp(
    cfg: RunConfig,
    *,
    peers: int,
    task: Task,
    eval_set: Sequence[Batch],
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    warm: WarmStart | None = None,
    label: str = "ddp",
) -> ArmResult:
    """Train one model on the union of the peers' batches, step by step: the data-parallel baseline."""
    started = time.perf_counter()
    model, _, curve = _train_ddp(
        cfg, peers=peers, task=task, device=device, warm=warm, stop=None, eval_set=eval_set, on_progress=on_progress
    )
    num_params = _param_count(model)
    per_step = ddp_bytes_per_step(num_params=num_params, peers=peers)
    return ArmResult(
        name=label,
        val_loss=curve[-1],
        upload_bytes_per_peer_per_step=per_step,
        upload_bytes_per_param_per_kstep=per_step / num_params * 1000,
        # A ring all-reduce receives as much as it sends; a "round" is local_steps steps.
        download_bytes_per_param_per_round=per_step * cfg.local_steps / num_params,
        val_loss_per_round=curve,
        wall_s=time.perf_counter() - started,
    )


def warm_start(cfg: RunConfig, *, peers: int, task: Task, device: torch.device, steps: int) -> WarmStart:
    """The DDP checkpoint after the schedule's first `steps` inner steps (a whole number of rounds)."""
    if steps % cfg.local_steps or not 0 < steps < cfg.rounds * cfg.local_steps:
        raise ValueError(f"a warm start takes whole rounds short of the run: {steps} steps of {cfg.local_steps}")
    model, optimizer, _ = _train_ddp(
        cfg, peers=peers, task=task, device=device, warm=None, stop=steps, eval_set=(), on_progress=None
    )
    return WarmStart(params=snapshot(model), steps=steps, optimizer_state=copy.deepcopy(optimizer.state_dict()))


def _train_ddp(
    cfg: RunConfig,
    *,
    peers: int,
    task: Task,
    device: torch.device,
    warm: WarmStart | None,
    stop: int | None,
    eval_set: Sequence[Batch],
    on_progress: ProgressCallback | None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    """DDP from the start (or `warm`) to step `stop` (None: the schedule's end); the model, its optimizer and its
    held-out loss after each round."""
    model = task.build_model(seed=cfg.seed).to(device)
    first = 0 if warm is None else warm.steps
    if warm is not None:
        load_params(model, warm.params)
    optimizer = _optimizer(cfg, model)
    if warm is not None:
        optimizer.load_state_dict(warm.optimizer_state)
    streams = _streams(cfg, task, peers=peers, skip=first)
    total = cfg.rounds * cfg.local_steps if stop is None else stop
    curve = []
    for step in range(first, total):
        batch = _joined([next(stream) for stream in streams])
        inner_step(
            model,
            optimizer,
            batch,
            lr=_lr(cfg, step),
            grad_clip=cfg.inner.grad_clip,
            autocast=True,
            loss_of=task.loss,
        )
        if on_progress:
            on_progress("ddp", step + 1 - first, total - first)
        if eval_set and (step + 1) % cfg.local_steps == 0:
            curve.append(evaluate(model, eval_set, device=device, loss_of=task.loss))
    return model, optimizer, curve


def _signed_update_bytes(
    cfg: RunConfig, *, identity: Identity, run_hash: str, round_index: int, tokens: int, payload: bytes, codec: str
) -> int:
    """Size on the wire of the signed header a peer sends with its payload."""
    header = UpdateHeader(
        protocol_version=PROTOCOL_VERSION,
        run_id=cfg.run_name,
        config_hash=run_hash,
        round=round_index,
        base_version=round_index,
        peer_public_key=identity.public_key,
        tokens=tokens,
        inner_steps=cfg.local_steps,
        codec=codec,
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=time.time(),
    )
    return len(sign_update(header, identity).to_bytes())


def run_diloco(
    cfg: RunConfig,
    *,
    label: str,
    peers: int,
    codec: Codec,
    aggregate_codec: Codec,
    task: Task,
    eval_set: Sequence[Batch],
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    warm: WarmStart | None = None,
    dropout: Dropout | None = None,
) -> ArmResult:
    """DiLoCo with P peers run one after another: inner AdamW, compressed pseudo-gradients, outer step."""
    started = time.perf_counter()
    master_model = task.build_model(seed=cfg.seed).to(device)
    first_round = 0 if warm is None else warm.steps // cfg.local_steps
    if warm is not None:
        load_params(master_model, warm.params)
    master = snapshot(master_model)
    spec = {name: tuple(t.shape) for name, t in master.items()}
    outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
    workers = [task.build_model(seed=cfg.seed).to(device) for _ in range(peers)]
    optimizers = [_optimizer(cfg, w) for w in workers]
    streams = _streams(cfg, task, peers=peers, skip=first_round * cfg.local_steps)
    identities = [generate_identity() for _ in range(peers)]
    peer_residuals: list[dict[str, torch.Tensor]] = [{} for _ in range(peers)]
    aggregator_residual: dict[str, torch.Tensor] = {}
    run_hash = config_hash(cfg)
    tokens_per_round = cfg.local_steps * task.most_work(batch_size=cfg.inner.batch_size)
    last_round = cfg.rounds + (0 if dropout is None else dropout.extra_rounds)
    total = (cfg.rounds - first_round) * cfg.local_steps * peers
    done = peer_steps = 0
    upload_bytes = download_bytes = 0
    curve = []
    for round_index in range(first_round, last_round):
        decoded = []
        active = peers if dropout is None or round_index < dropout.at_round else dropout.peers_left
        peer_steps += active * cfg.local_steps
        for p, worker in enumerate(workers[:active]):
            load_params(worker, master)
            for local in range(cfg.local_steps):
                step = round_index * cfg.local_steps + local
                inner_step(
                    worker,
                    optimizers[p],
                    next(streams[p]),
                    lr=_lr(cfg, step),
                    grad_clip=cfg.inner.grad_clip,
                    autocast=True,
                    loss_of=task.loss,
                )
                done += 1
                if on_progress:
                    on_progress(label, done, total)
            delta = {k: v.float().cpu() for k, v in pseudo_gradient(master, worker).items()}
            payload = codec.encode(delta, peer_residuals[p])
            upload_bytes += len(payload) + _signed_update_bytes(
                cfg,
                identity=identities[p],
                run_hash=run_hash,
                round_index=round_index,
                tokens=tokens_per_round,
                payload=payload,
                codec=codec.name,
            )
            decoded.append(codec.decode(payload, spec))
        mean = weighted_mean(decoded, [float(tokens_per_round)] * active)
        aggregate = encode_aggregate(mean, codec=aggregate_codec, state=aggregator_residual)
        download_bytes += len(aggregate)
        applied = {k: v.to(device) for k, v in aggregate_codec.decode(aggregate, spec).items()}
        outer.step(master, applied)
        load_params(master_model, master)
        curve.append(evaluate(master_model, eval_set, device=device, loss_of=task.loss))
    num_params = _param_count(master_model)
    per_step = upload_bytes / peer_steps
    return ArmResult(
        name=label,
        val_loss=curve[-1],
        upload_bytes_per_peer_per_step=per_step,
        upload_bytes_per_param_per_kstep=per_step / num_params * 1000,
        download_bytes_per_param_per_round=download_bytes / len(curve) / num_params,
        val_loss_per_round=curve,
        wall_s=time.perf_counter() - started,
    )


def simulate(
    cfg: RunConfig,
    *,
    peers: int,
    codecs: Sequence[str],
    device: torch.device,
    eval_batches: int = 16,
    on_progress: ProgressCallback | None = None,
) -> SimulationResult:
    """Run the DDP baseline and one DiLoCo arm per codec on the same data; compare loss and bytes.

    A codec named like the config's upload codec uses the config's parameters; others use their
    defaults. The aggregate (download) codec is the config's, re-encoding the mean with the
    aggregator's own error feedback.
    """
    if peers < 1:
        raise ValueError(f"--peers must be at least 1 (got {peers})")
    task = run_task(cfg)
    arms_to_run = []
    for text in codecs:
        label, name, params = parse_arm(text)
        # "down.X=v" sets X for the aggregate (download) only; plain params set both directions. A bare
        # codec name that the config names too takes the config's parameters.
        both = {k: v for k, v in params.items() if not k.startswith("down.")}
        down = {k.removeprefix("down."): v for k, v in params.items() if k.startswith("down.")}
        upload = both or (cfg.codec.params if name == cfg.codec.name and not down else {})
        download = (both | down) or (cfg.aggregate_codec.params if name == cfg.aggregate_codec.name else {})
        arms_to_run.append((label, make_codec(name, upload), make_codec(name, download)))
    eval_set = [
        batch_to(b, device) for b in task.held_out_batches(batch_size=cfg.inner.batch_size, count=eval_batches)
    ]
    initial = evaluate(task.build_model(seed=cfg.seed).to(device), eval_set, device=device, loss_of=task.loss)
    ddp = run_ddp(cfg, peers=peers, task=task, eval_set=eval_set, device=device, on_progress=on_progress)
    arms = [ddp]
    for label, codec, aggregate_codec in arms_to_run:
        arm = run_diloco(
            cfg,
            label=label,
            peers=peers,
            codec=codec,
            aggregate_codec=aggregate_codec,
            task=task,
            eval_set=eval_set,
            device=device,
            on_progress=on_progress,
        )
        arm.gap_pct = (arm.val_loss - ddp.val_loss) / ddp.val_loss * 100
        arm.reduction_vs_ddp = ddp.upload_bytes_per_peer_per_step / arm.upload_bytes_per_peer_per_step
        arms.append(arm)
        logger.info("arm %s: val loss %.4f (%+.2f%% vs DDP)", arm.name, arm.val_loss, arm.gap_pct)
    for arm in arms:
        if not math.isfinite(arm.val_loss):
            logger.warning("arm %s diverged (val loss %s)", arm.name, arm.val_loss)
    return SimulationResult(
        initial_val_loss=initial,
        num_params=sum(math.prod(shape) for shape in task.parameter_shapes().values()),
        peers=peers,
        rounds=cfg.rounds,
        local_steps=cfg.local_steps,
        tokens_per_arm=cfg.rounds * cfg.local_steps * peers * task.most_work(batch_size=cfg.inner.batch_size),
        outer=cfg.outer.kind,
        config_hash=config_hash(cfg),
        arms=arms,
    )
