"""When a round's inner steps run and when they stop: the time box, and overlap's training ahead of the base.

Without overlap a round's steps run from the master state until the local steps are done or one more
would leave too little time to upload before the deadline. With overlap the next round's steps start
right after the snapshot, from this peer's guess of the next master state, and run through the upload,
the wait for the round to close and the download; at most the overlap limit's share of them run before
the real base arrives. Steps taken before it are stale: each round counts them, and after an update
that was mostly stale is dropped at round close the limit falls to SAFE_OVERLAP_LIMIT.
"""

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Sequence

import torch

from potluck.peer.records import Master
from potluck.peer.trainer import LocalTrainer, RoundSnapshot, RoundWork
from potluck.protocol.codecs import Codec
from potluck.protocol.config import RunConfig

logger = logging.getLogger(__name__)

TIME_BOX_MARGIN = 0.1  # of the round deadline, kept free: the round opened a download before the peer saw it
# The overlap limit a peer falls back to once an update with more than this share of stale steps was dropped at
# round close: at 15 of 30 stale steps the held-out check dropped no honest update, at 30 of 30 one in nine
# (docs/experiments/overlap.md): each such drop costs the round's credit.
SAFE_OVERLAP_LIMIT = 0.5


class RoundPacer:
    """The time box of a round's inner steps and, with overlap, how far they may run ahead of their base."""

    def __init__(self, trainer: LocalTrainer, cfg: RunConfig, *, overlap: bool, overlap_limit: float) -> None:
        self.trainer = trainer
        self.local_steps = cfg.local_steps
        self.deadline_s = cfg.round_deadline_s
        self.overlap = overlap
        self.limit = overlap_limit  # lowered to SAFE_OVERLAP_LIMIT after a stale update's drop
        self.base_arrived = threading.Event()  # cleared while overlapped steps run ahead of their round's base
        self.base_arrived.set()
        self.round_opened: float | None = None  # monotonic time the training round opened, as seen here
        self.upload_s = 0.0  # the last upload's duration, which the time box keeps free
        self.stale_next = 0  # the next round's steps taken before its base arrived

    def time_box_full(self) -> bool:
        """True when one more step would leave too little time to upload before the round's deadline.

        The round opens, as this peer sees it, when the previous round's aggregate arrived; it plans
        with its own smoothed step time and its last upload's duration, and keeps a tenth of the
        deadline as margin (the aggregator opened the round a download earlier). Before the aggregate
        arrives (overlap) there is no deadline yet to plan against; a peer at its overlap limit waits
        here, in the training thread, until the aggregate has arrived or the run stops.
        """
        if not self.base_arrived.is_set() and self.trainer.round_steps >= self.stale_limit():
            self.base_arrived.wait()
        opened = self.round_opened
        if opened is None:
            return False
        step_s = self.trainer.step_s or 0.0
        return time.monotonic() + step_s + self.upload_s > opened + (1 - TIME_BOX_MARGIN) * self.deadline_s

    def stale_limit(self) -> int:
        """The most inner steps of a round that may run before its base arrives (PeerOptions.overlap_limit)."""
        return max(1, math.floor(self.limit * self.local_steps))

    def take_stale(self) -> int:
        """The steps of the round now starting that ran before its base arrived (0 without overlap)."""
        stale, self.stale_next = self.stale_next, 0
        return stale

    def run_ahead(self) -> None:
        """The next round's steps start before its base: no deadline to plan against until the base arrives."""
        self.round_opened = None  # the next round opens when this one's aggregate arrives
        self.base_arrived.clear()

    def base_in(self, stale_steps: int) -> None:
        """The base of the round running ahead arrived, `stale_steps` of its steps after they began."""
        self.stale_next = stale_steps
        self.base_arrived.set()

    def opened_at(self, closed_s: float) -> None:
        """The next round opened when this one closed (`closed_s`, the aggregate's signed wall-clock time).

        A peer that fetched the aggregate late is that much further into the next round's deadline.
        """
        late_s = min(max(time.time() - closed_s, 0.0), self.deadline_s)
        self.round_opened = time.monotonic() - late_s

    def after_drop(self, round_index: int, *, stale_steps: int, inner_steps: int) -> None:
        """After an update was dropped at round close: if most of its steps ran ahead of their base, let at most
        SAFE_OVERLAP_LIMIT of a round's steps do so from now on.

        An update trained mostly from the peer's guess of the state, not from the state itself, can fail the
        aggregator's held-out check though honest, and every such drop costs the round's credit.
        """
        if not self.overlap or stale_steps * 2 <= inner_steps or self.limit <= SAFE_OVERLAP_LIMIT:
            return
        self.limit = SAFE_OVERLAP_LIMIT
        logger.warning(
            "round %d: the dropped update had %d of %d steps trained ahead of its base; overlap now waits for the "
            "base after %d steps (as --overlap-limit %g)",
            round_index,
            stale_steps,
            inner_steps,
            self.stale_limit(),
            SAFE_OVERLAP_LIMIT,
        )


class InnerSteps:
    """A round's inner steps in a worker thread, stopped by the pacer's time box; at most one run at a time."""

    def __init__(self, trainer: LocalTrainer, pacer: RoundPacer) -> None:
        self.trainer = trainer
        self.pacer = pacer
        self.cancel = threading.Event()  # set: the running steps stop after the current one
        self.running: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Start the round's steps, up to the local steps or until the time box is full."""
        self.running = asyncio.ensure_future(
            asyncio.to_thread(
                self.trainer.train, max_steps=self.pacer.local_steps, stop=self.pacer.time_box_full, cancel=self.cancel
            )
        )

    async def finish(self) -> None:
        """Run the round's steps to their end (starting them, unless overlap already did)."""
        if self.running is None:
            self.start()
        assert self.running is not None
        await self.running
        self.running = None

    async def stop(self) -> None:
        """Stop steps that run ahead (a resync, or the end of the run) and wait for their thread to let go."""
        if self.running is None:
            return
        self.cancel.set()
        self.pacer.base_arrived.set()  # a thread waiting at the overlap limit
        with contextlib.suppress(Exception):
            await self.running
        self.running = None
        self.cancel.clear()


def guess_next_state(
    trainer: LocalTrainer,
    master: Master,
    works: Sequence[RoundWork],
    codecs: Sequence[tuple[Codec, Codec]],
    shot: RoundSnapshot,
) -> dict[str, torch.Tensor]:
    """Move the model onto this peer's guess of the next master state, before overlapped training; the guess.

    The guess is each shard's outer step applied to this peer's own update as sent: what the
    round's aggregate would be if every peer had sent the same (the "eager" update of Kale et al.
    2025, fitted to a lossy code). Steps taken from the peer's own snapshot instead start from
    progress the sparse update left in the residual, which the run then counts twice
    (docs/experiments/overlap.md: on a GPU, where all of a round's steps ran before the aggregate
    came, the held-out loss rose after round 1). The encode that the guess needs runs before the
    overlapped steps start, so it is the one part of a round that overlap does not hide.
    """
    guess: dict[str, torch.Tensor] = {}
    for s, w, (upload, _) in zip(master.shards, works, codecs, strict=True):
        params = {name: master.params[name] for name in s.names}
        sent = upload.decode(w.payload, {name: tuple(t.shape) for name, t in params.items()})
        guess.update(s.outer.preview(params, sent))
    trainer.move_onto(guess, point=shot.current)
    return guess
