"""The volunteer's local work: inner AdamW steps from the master state, then the encoded delta.

The model and its AdamW state live across rounds (DiLoCo keeps each worker's inner optimizer). A
round's delta is measured from its *base*, the master parameters it belongs to. Without overlap the
model is reset to the base at the start of every round. With overlap (one-step-delayed outer
updates, as in Streaming DiLoCo) the peer keeps training while its last update is in flight, from
its guess of the next master state (`move_onto`: the outer step applied to its own sent update, the
"eager" guess of Kale et al. 2025); when that round's aggregate arrives, `rebase` moves the model
onto the real master state and keeps the progress made since, so no step is thrown away.

Training runs in a worker thread while the peer's event loop talks to the aggregator, so every
touch of the model (a step, a snapshot, a rebase) holds one lock: a rebase waits at most one step.

The inner learning-rate schedule follows the run's global step, so a late joiner picks up the
schedule where the run is. Each peer draws its own batches: the sampler's seed mixes the run seed
with the peer's public key, so two volunteers never train on the same sequence of windows.
"""

import hashlib
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from potluck.errors import PotluckError
from potluck.protocol.codecs import Codec, NonFiniteError, make_codec
from potluck.protocol.config import RunConfig
from potluck.tasks import Task, TaskMismatch, architecture_fingerprint, check_task, run_task, task_for
from potluck.training.diloco import inner_lr, inner_step, load_params, make_inner_optimizer, snapshot

STEP_TIME_SMOOTHING = 0.3  # weight of the newest step in the step-time estimate the time box plans with


class TrainingDiverged(PotluckError):
    """Local training produced non-finite values: nothing sensible can be sent (one line, for the user)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundWork:
    """What one round of local training produced."""

    payload: bytes  # the encoded pseudo-gradient (of one shard's tensors in a sharded run)
    tokens: int  # the work its batches were worth (potluck.tasks.Task.work): tokens, or samples
    inner_steps: int
    mean_loss: float  # mean training loss over the round's inner steps
    compute_s: float  # time spent in the round's inner steps
    encode_s: float = 0.0  # time spent encoding the delta
    codec: str = ""  # the codec the payload is in
    shard: int = 0  # the shard the payload is for (protocol/shards.py; 0 in a run of one shard)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundSnapshot:
    """The end of a round's training: where it started from, where the model is, and what it cost."""

    base: dict[str, torch.Tensor]  # the master parameters the round's delta is measured from
    current: dict[str, torch.Tensor]  # the model's parameters at the snapshot (CPU, fp32)
    losses: tuple[float, ...]
    compute_s: float
    work: int = 0  # what its batches were worth (tokens for a language model): the update's claim


def sampler_seed(run_seed: int, public_key: bytes) -> int:
    """A per-peer data seed: the run's seed mixed with the peer's key (non-negative, 62 bits)."""
    mix = hashlib.sha256(run_seed.to_bytes(8, "big") + public_key).digest()
    return int.from_bytes(mix[:8], "big") >> 2


class LocalTrainer:
    """A peer's model, inner optimizer, data stream and error-feedback residual.

    The model and batches come from the run's task (`task`, or the one the run's config names, reading
    `data_source` in place of its data.source). `micro_batch` and `checkpointing` trade compute for memory
    (gradient accumulation, recomputed activations) without changing the step. `speed` below 1 makes every
    inner step last 1/speed times as long (a sleep after the step): a testing aid that shows a slow GPU's
    behaviour on one machine.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        public_key: bytes,
        device: torch.device,
        data_source: str | None = None,
        batch_size: int | None = None,
        speed: float = 1.0,
        task: Task | None = None,
        micro_batch: int | None = None,
        checkpointing: bool = False,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not 0 < speed <= 1:
            raise ValueError(f"speed must be in (0, 1], got {speed}")
        self.cfg = cfg
        self.device = device
        self.speed = speed
        self.task = task or (run_task(cfg) if data_source is None else task_for(cfg, data_source=data_source))
        check_task(cfg, self.task)  # TaskMismatch: this node builds another model than the run's
        self.batch_size = batch_size or cfg.inner.batch_size
        recorded = cfg.task.fingerprint
        if model is not None and recorded is not None and architecture_fingerprint(model) != recorded:
            raise TaskMismatch(
                f"the model given is another architecture than run {cfg.run_name!r} trains (task {cfg.task.name}); "
                "build it as the run's task does"
            )
        self.model = model if model is not None else self.task.build_model(seed=cfg.seed).to(device)
        if checkpointing:
            self.task.enable_checkpointing(self.model)
        self.micro_batch = micro_batch
        self.optimizer = optimizer or make_inner_optimizer(
            self.model, lr=cfg.inner.lr, betas=(cfg.inner.beta1, cfg.inner.beta2), weight_decay=cfg.inner.weight_decay
        )
        self.batches = self.task.train_batches(seed=sampler_seed(cfg.seed, public_key), batch_size=self.batch_size)
        self.codec = make_codec(cfg.codec.name, cfg.codec.params)
        self.residual: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._base: dict[str, torch.Tensor] = {}
        self.global_step = 0  # the inner LR schedule's position
        self._losses: list[float] = []  # this round's, since its last snapshot
        self._work = 0  # and the work of its batches (tokens for a language model)
        self.total_work = 0
        self._compute_s = 0.0
        self.step_s: float | None = None  # smoothed wall time of one inner step (sleep included)
        self.total_steps = 0
        self.total_compute_s = 0.0
        self.first_step_at: float | None = None  # time.monotonic() of the first step's start
        self.last_step_at: float | None = None  # and of the latest step's end

    @property
    def round_steps(self) -> int:
        """Inner steps taken since the last snapshot."""
        return len(self._losses)

    def start_round(self, master: Mapping[str, torch.Tensor], *, round_index: int) -> None:
        """Reset the model to `master` for round `round_index` (after a sync, or every round without overlap)."""
        with self._lock:
            load_params(self.model, master)
            self._base = {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in master.items()}
            self.global_step = round_index * self.cfg.local_steps
            self._losses, self._compute_s, self._work = [], 0.0, 0

    def rebase(self, master: Mapping[str, torch.Tensor], *, point: Mapping[str, torch.Tensor]) -> int:
        """Move the model onto the new `master`, keeping the progress made since it was at `point`; the steps kept.

        model += master - point: the steps taken while the aggregate was in flight are applied on top
        of the new state rather than thrown away, and they count towards the round that `master` opens.
        Their number says how stale that round's update is (the round event's `stale_steps`).
        """
        with self._lock, torch.no_grad():
            self._shift(master, point)
            self._base = {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in master.items()}
            return self.round_steps

    def move_onto(self, guess: Mapping[str, torch.Tensor], *, point: Mapping[str, torch.Tensor]) -> None:
        """Move the model from `point` onto `guess` (keeping the steps taken since), its round's base unchanged.

        An overlapped peer trains from its guess of the next master state rather than from its own
        snapshot: the snapshot holds progress the sparse update did not carry (it waits in the
        residual), and steps taken from there would count it twice once the real state arrives.
        """
        with self._lock, torch.no_grad():
            self._shift(guess, point)

    def _shift(self, to: Mapping[str, torch.Tensor], point: Mapping[str, torch.Tensor]) -> None:
        for name, p in self.model.named_parameters():
            shift = to[name].to(torch.float32) - point[name]
            p.add_(shift.to(p.device, p.dtype))

    def train(
        self,
        *,
        max_steps: int,
        stop: Callable[[], bool] | None = None,
        cancel: threading.Event | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        """Take inner steps until the round has `max_steps`, `stop()` says the time box is full, or `cancel` is set.

        A round always gets at least one step: an update with none cannot be sent.
        """
        cfg = self.cfg
        total_steps = cfg.rounds * cfg.local_steps
        while self.round_steps < max_steps and not (cancel is not None and cancel.is_set()):
            if self.round_steps > 0 and stop is not None and stop():
                break
            started = time.monotonic()
            with self._lock:
                lr = inner_lr(
                    min(self.global_step, total_steps - 1),
                    total_steps=total_steps,
                    peak_lr=cfg.inner.lr,
                    warmup_steps=cfg.inner.warmup_steps,
                    min_lr_ratio=cfg.inner.min_lr_ratio,
                )
                batch = next(self.batches)
                loss = inner_step(
                    self.model,
                    self.optimizer,
                    batch,
                    lr=lr,
                    grad_clip=cfg.inner.grad_clip,
                    autocast=True,
                    loss_of=self.task.loss,
                    micro_batch=self.micro_batch,
                )
                self.global_step += 1
                work = self.task.work(batch)
            if self.speed < 1:
                time.sleep((time.monotonic() - started) * (1 / self.speed - 1))
            ended = time.monotonic()
            took = ended - started
            with self._lock:
                self._losses.append(loss)
                self._compute_s += took
                self._work += work
            self.total_work += work
            self.step_s = (
                took if self.step_s is None else (1 - STEP_TIME_SMOOTHING) * self.step_s + (STEP_TIME_SMOOTHING * took)
            )
            self.total_steps += 1
            self.total_compute_s += took
            self.first_step_at = started if self.first_step_at is None else self.first_step_at
            self.last_step_at = ended
            if on_step is not None:
                on_step(self.round_steps, max_steps)

    def take_snapshot(self) -> RoundSnapshot:
        """End the round's training: its base, the model's parameters now, its losses; the next round starts here."""
        with self._lock:
            shot = RoundSnapshot(
                base=self._base,
                current=snapshot(self.model, device="cpu"),
                losses=tuple(self._losses),
                work=self._work,
                compute_s=self._compute_s,
            )
            self._losses, self._compute_s, self._work = [], 0.0, 0
        return shot

    def encode(self, shot: RoundSnapshot, *, round_index: int) -> RoundWork:
        """The round's delta (base - current), compressed with error feedback; TrainingDiverged when non-finite."""
        return self.encode_shards(shot, round_index=round_index, shards=[(tuple(shot.base), self.codec)])[0]

    def encode_shards(
        self, shot: RoundSnapshot, *, round_index: int, shards: Sequence[tuple[Sequence[str], Codec]]
    ) -> list[RoundWork]:
        """The round's delta cut into shards, each compressed with its codec and its part of the error feedback.

        One RoundWork per shard, in order; the tokens, steps and losses are the whole round's in each.
        """
        delta = {name: shot.base[name] - shot.current[name] for name in shot.base}
        mean_loss = math.fsum(shot.losses) / max(1, len(shot.losses))
        works = []
        for index, (names, codec) in enumerate(shards):
            started = time.monotonic()
            residual = {name: self.residual[name] for name in names if name in self.residual}  # this shard's
            try:
                payload = codec.encode({name: delta[name] for name in names}, residual)
            except NonFiniteError:
                raise TrainingDiverged(
                    f"local training diverged in round {round_index} (mean loss {mean_loss:.4g}): the model's "
                    "values are no longer finite; if the run's held-out loss blew up too, tell its operator"
                ) from None
            self.residual.update(residual)
            works.append(
                RoundWork(
                    payload=payload,
                    tokens=shot.work,
                    inner_steps=len(shot.losses),
                    mean_loss=mean_loss,
                    compute_s=shot.compute_s,
                    encode_s=time.monotonic() - started,
                    codec=codec.name,
                    shard=index,
                )
            )
        return works

    def train_round(
        self,
        master: dict[str, torch.Tensor],
        *,
        round_index: int,
        time_budget_s: float,
        on_step: Callable[[int, int], None] | None = None,
    ) -> RoundWork:
        """A whole round without overlap: reset to `master`, train up to the local steps within the budget, encode."""
        self.start_round(master, round_index=round_index)
        started = time.monotonic()
        self.train(
            max_steps=self.cfg.local_steps, stop=lambda: time.monotonic() - started > time_budget_s, on_step=on_step
        )
        return self.encode(self.take_snapshot(), round_index=round_index)
