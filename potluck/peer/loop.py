"""The round loop: train (time-boxed), snapshot, encode, submit, fetch the round's aggregate, apply it, report.

With overlap the next round's inner steps start right after the snapshot and run in their thread
through the upload, the wait for the round to close and the download; the aggregate is then merged
with `trainer.rebase` (overlap.py). Without it the model is reset to the new master state. In a
sharded run each step but training happens once per shard, with the shard's aggregator: each shard's
part of a round is one record (ShardRound) that the steps pass along.
"""

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from potluck.events import Event, PeerRound
from potluck.peer.final_receipts import FinalReceipts, total_points
from potluck.peer.inner_state import StateWriter
from potluck.peer.options import PeerDiverged, PeerError, PeerOptions, RunFinished
from potluck.peer.overlap import InnerSteps, RoundPacer, guess_next_state
from potluck.peer.records import HeldOutScore, Master, Shard, Tally, apply_shard_aggregate
from potluck.peer.serving import StateServer
from potluck.peer.sync import Sync
from potluck.peer.trainer import LocalTrainer, RoundSnapshot, RoundWork, TrainingDiverged
from potluck.protocol.client import AggregatorRefused, Transfer
from potluck.protocol.codecs import Codec
from potluck.protocol.config import RunConfig
from potluck.protocol.density import round_codecs
from potluck.protocol.envelope import EnvelopeError, SignedAggregate, SignedReceipt, SignedUpdate
from potluck.protocol.identity import Identity

logger = logging.getLogger(__name__)


class UpdateMaker(Protocol):
    """Where a round's updates are made and what runs after they are sent (PeerRunner; a red-team subclass)."""

    def make_update(self, master: Master, work: RoundWork, trainer: LocalTrainer) -> tuple[SignedUpdate, bytes]:
        """The signed update for one shard's work of the round."""
        ...

    async def after_submit(self) -> None:
        """Called after each round's upload."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Sent:
    """One shard's update of a round as sent, and the aggregator's answer on arrival (checked after the upload)."""

    shard: Shard
    codec: Codec  # the round's upload codec for the shard (at its density)
    work: RoundWork
    update: SignedUpdate
    payload: bytes
    receipt: SignedReceipt  # `accepted`: the arrival checks' word; `round`: the round the update counts in
    transfer: Transfer

    @property
    def digest(self) -> bytes:
        """The update's digest: how receipts and the aggregator's events name it."""
        return self.update.header.digest()

    @property
    def received(self) -> bool:
        """Whether the update passed the arrival checks (the round-close checks come later)."""
        return self.receipt.receipt.accepted

    @property
    def counts_in(self) -> int:
        """The round the update counts in: a late update is accepted into the open round (late_updates)."""
        return self.receipt.receipt.round


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardRound:
    """One shard's part of a closed round: the update as sent and the round's aggregate as fetched."""

    sent: Sent
    aggregate: SignedAggregate
    payload: bytes  # the aggregate's
    transfer: Transfer

    @property
    def shard(self) -> Shard:
        """The shard this part of the round is about."""
        return self.sent.shard

    def lists(self, public_key: bytes) -> bool:
        """Whether the aggregate's signed contributor list, the final word on the round, names `public_key`."""
        return public_key in dict(self.aggregate.header.contributors)


@dataclass(frozen=True, kw_only=True, slots=True)
class Credit:
    """What the final receipts of a round credited, and what fetching them cost."""

    points: float | None  # None: none credited, or one did not check out
    receipt_bytes: int
    receipt_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """What became of this peer's update of a round, by the receipts on arrival and the signed contributor lists."""

    accepted: bool  # counted in the round, in every shard
    reason: str  # why not (the arrival checks' words, a drop at round close), or that it counts late
    late: bool  # accepted into the next round instead (late_updates): tallied when that round closes
    dropped: bool  # passed the arrival checks, then failed the round's checks at close


def judge(r: int, rounds: Sequence[ShardRound], *, public_key: bytes) -> Verdict:
    """The verdict on the update `public_key` sent in round `r`, from each shard's part of the round.

    The signed contributor list is the final word: an update can pass on arrival and still be
    dropped by the round's statistical checks.
    """
    reasons = [part.sent.receipt.receipt.reason for part in rounds if not part.sent.received]
    accepted = all(part.sent.received and part.lists(public_key) and part.sent.counts_in == r for part in rounds)
    late = any(part.sent.received and part.sent.counts_in > r for part in rounds)
    dropped = not late and not reasons and not accepted
    reason = "; ".join(dict.fromkeys(reasons))
    if late:
        reason = f"late: it counts in round {r + 1} at the run's discount"
    elif dropped:
        reason = "dropped at round close by the round's checks (see the aggregator's log)"
    return Verdict(accepted=accepted, reason=reason, late=late, dropped=dropped)


class RoundLoop:
    """Rounds until the run or `max_rounds` is done; with overlap, training never waits on the network."""

    def __init__(
        self,
        maker: UpdateMaker,
        *,
        identity: Identity,
        options: PeerOptions,
        trainer: LocalTrainer,
        cfg: RunConfig,
        sync: Sync,
        serving: StateServer,
        receipts: FinalReceipts,
        score: HeldOutScore,
        tally: Tally,
        on_event: Callable[[Event], None],
        inner_state: StateWriter | None = None,
    ) -> None:
        self.maker = maker
        self.identity = identity
        self.options = options
        self.trainer = trainer
        self.cfg = cfg
        self.sync = sync
        self.serving = serving
        self.receipts = receipts
        self.score = score
        self.tally = tally
        self.on_event = on_event
        self.inner_state = inner_state  # keeps the optimizer's state for a restart
        self.pacer = RoundPacer(trainer, cfg, overlap=options.overlap, overlap_limit=options.overlap_limit)
        self.steps = InnerSteps(trainer, self.pacer)

    async def run(self, master: Master) -> None:
        """Round after round from `master`; RunFinished once the run's last round is done."""
        try:
            await self._start_round(master)
            self.pacer.round_opened = self.sync.synced_at
            while master.round < self.cfg.rounds and not self._enough():
                master = await self._round(master)
        finally:
            # a run that ends or fails mid-round stops the training thread before the node goes
            await self.steps.stop()
        if master.round >= self.cfg.rounds:
            raise RunFinished(f"run {self.cfg.run_name!r} is complete ({self.cfg.rounds} rounds)")

    async def _start_round(self, master: Master) -> None:
        """Reset the model to `master` and open its round for training."""
        await asyncio.to_thread(self.trainer.start_round, master.params, round_index=master.round)

    def _enough(self, *, ahead: int = 0) -> bool:
        """Whether `max_rounds` are done once `ahead` more rounds are."""
        limit = self.options.max_rounds
        return limit is not None and self.tally.rounds_done + ahead >= limit

    def _last(self, master: Master) -> bool:
        """Whether the round now running is this peer's last (the run's, or its `max_rounds`)."""
        return master.round + 1 >= self.cfg.rounds or self._enough(ahead=1)

    async def _round(self, master: Master) -> Master:
        """One round from `master`; the master to go on from (the same, moved on, or downloaded again)."""
        await self.serving.announce_holding(master)
        r = master.round
        stale_steps = self.pacer.take_stale()
        codecs = [round_codecs(self.cfg, s.density) for s in master.shards]  # the aggregators pick each round's
        self.trainer.codec = codecs[0][0]  # a run of one shard's codec, for whoever reads it (the red team)
        await self.steps.finish()
        shot = await asyncio.to_thread(self.trainer.take_snapshot)
        if self.inner_state is not None:  # no step runs now: the optimizer holds this round's end
            await self.inner_state.after_round(self.trainer.optimizer, r)
        works = await self._encode(master, shot, codecs)
        point: Mapping[str, torch.Tensor] = shot.current  # where the next round's steps start from
        if self.options.overlap and not self._last(master):
            # The next round's steps run from the guess while this round's update and aggregate are in flight.
            point = await asyncio.to_thread(guess_next_state, self.trainer, master, works, codecs, shot)
            self.pacer.run_ahead()
            self.steps.start()
        sent = await self._send(master, works, [upload for upload, _ in codecs])
        try:
            rounds = await asyncio.gather(*(self._aggregate_of(s, r) for s in sent))
        except AggregatorRefused as e:
            logger.warning("round %d: %s; downloading the state again", r, e)
            return await self._resync()
        for part in rounds:
            self.tally.bytes_down += part.transfer.sent_bytes + len(part.transfer.body)
        late_points = await self._settle_late(r, rounds)
        verdict = self._judge(r, rounds, stale_steps=stale_steps)
        master = await self._apply(master, rounds, point)
        self.pacer.opened_at(max(part.aggregate.header.timestamp_s for part in rounds))
        credit = await self._collect_receipts(r, rounds, late_points)
        val_loss = await self.score(self.cfg, master.params)
        self.tally.rounds_done += 1
        self.on_event(
            self._round_event(
                r,
                rounds,
                stale_steps=stale_steps,
                verdict=verdict,
                credit=credit,
                val_loss=val_loss,
                shards=len(master.shards),
            )
        )
        return master

    async def _encode(
        self, master: Master, shot: RoundSnapshot, codecs: Sequence[tuple[Codec, Codec]]
    ) -> list[RoundWork]:
        """The round's work, encoded once per shard at the shard's upload codec."""
        uploads = [(s.names, upload) for s, (upload, _) in zip(master.shards, codecs, strict=True)]
        try:
            return await asyncio.to_thread(self.trainer.encode_shards, shot, round_index=master.round, shards=uploads)
        except TrainingDiverged as e:
            raise PeerDiverged(str(e)) from None

    async def _send(self, master: Master, works: Sequence[RoundWork], codecs: Sequence[Codec]) -> list[Sent]:
        """Make each shard's update, submit them all, then check the aggregators' answers on arrival."""
        made = [
            (shard, codec, work, await asyncio.to_thread(self.maker.make_update, master, work, self.trainer))
            for shard, codec, work in zip(master.shards, codecs, works, strict=True)
        ]
        sent = await asyncio.gather(*(self._submit(shard, codec, work, update) for shard, codec, work, update in made))
        self.pacer.upload_s = max(s.transfer.wait_s + s.transfer.transfer_s for s in sent)
        for s in sent:
            self.tally.bytes_up += s.transfer.sent_bytes
            self.tally.bytes_down += len(s.transfer.body)
        await self.maker.after_submit()
        for s in sent:
            try:
                s.receipt.verify(s.shard.key)
            except EnvelopeError as e:
                raise PeerError(f"the aggregator's receipt does not verify: {e}") from e
            if not s.received:  # the arrival checks; the round-close checks come later
                # Its work is not folded back into the residual: the next update would carry two rounds'
                # progress and the round's norm check drops it (every time in the chaos soak).
                logger.warning("round %d: update rejected: %s", master.round, s.receipt.receipt.reason)
        return sent

    async def _submit(self, shard: Shard, codec: Codec, work: RoundWork, made: tuple[SignedUpdate, bytes]) -> Sent:
        """Upload one shard's update to the shard's aggregator as it is when called (a fail-over may move it)."""
        update, payload = made

        async def submit() -> tuple[SignedReceipt, Transfer]:
            return await shard.link.submit(update, payload)

        receipt, transfer = await self.sync.retrying("submitting", submit, shard=shard)
        return Sent(
            shard=shard, codec=codec, work=work, update=update, payload=payload, receipt=receipt, transfer=transfer
        )

    async def _aggregate_of(self, sent: Sent, r: int) -> ShardRound:
        """Round `r`'s aggregate of the shard; after a fail-over the update first goes to the new aggregator.

        The standby that took the shard over never saw an update sent to the primary before it went, and
        its round waits for the peers the primary last heard from.
        """
        shard, sent_to = sent.shard, sent.shard.key

        async def attempt() -> tuple[SignedAggregate, bytes, Transfer]:
            nonlocal sent_to
            if shard.key != sent_to:
                await shard.link.submit(sent.update, sent.payload)
                sent_to = shard.key
            return await shard.link.fetch_aggregate(r, timeout_s=2 * self.cfg.round_deadline_s + 60)

        aggregate, payload, transfer = await self.sync.retrying("fetching the aggregate", attempt, shard=shard)
        return ShardRound(sent=sent, aggregate=aggregate, payload=payload, transfer=transfer)

    async def _settle_late(self, r: int, rounds: Sequence[ShardRound]) -> list[float | None]:
        """Settle the late updates these aggregates took in, and note this round's updates that count later."""
        late_points: list[float | None] = []
        for part in rounds:
            late_points.append(await self.receipts.settle_late(r, part.shard, part.aggregate))
            if part.sent.received and part.sent.counts_in > r:
                self.receipts.note_late(part.shard.index, counts_in=part.sent.counts_in, digest=part.sent.digest)
        return late_points

    def _judge(self, r: int, rounds: Sequence[ShardRound], *, stale_steps: int) -> Verdict:
        """The verdict on this round's update, logged and tallied (a late one is tallied when its round closes)."""
        verdict = judge(r, rounds, public_key=self.identity.public_key)
        if verdict.late or verdict.dropped:
            logger.warning("round %d: update %s", r, verdict.reason)
        if verdict.dropped:
            self.pacer.after_drop(r, stale_steps=stale_steps, inner_steps=rounds[0].sent.work.inner_steps)
        if not verdict.late:
            self.tally.accepted += verdict.accepted
            self.tally.rejected += not verdict.accepted
        return verdict

    async def _apply(self, master: Master, rounds: Sequence[ShardRound], point: Mapping[str, torch.Tensor]) -> Master:
        """Apply each shard's aggregate and open the next round on the new master; a fresh download when one fails."""
        if not all(apply_shard_aggregate(master, part.shard, part.aggregate, part.payload) for part in rounds):
            return await self._resync()
        master.round += 1
        if self.steps.running is not None:
            self.pacer.base_in(await asyncio.to_thread(self.trainer.rebase, master.params, point=point))
        else:
            await self._start_round(master)
        return master

    async def _resync(self) -> Master:
        """Stop any early training, download the state again and restart the round from it."""
        await self.steps.stop()
        master = await self.sync.retrying("downloading the state", self.sync.sync_from_any)
        await self._start_round(master)
        return master

    async def _collect_receipts(self, r: int, rounds: Sequence[ShardRound], late_points: list[float | None]) -> Credit:
        """The final receipts of this round's updates that counted in it, with the late ones' points."""
        points = total_points(late_points)
        receipt_bytes, receipt_s = 0, 0.0
        collected: list[float | None] = []
        for part in rounds:
            if part.sent.received and part.sent.counts_in == r:
                got, nbytes, took = await self.receipts.collect(part.shard, r, part.sent.digest, part.aggregate)
                collected.append(got)
                receipt_bytes, receipt_s = receipt_bytes + nbytes, receipt_s + took
        if collected:
            points = total_points([points, *collected]) if None not in collected else None
        return Credit(points=points, receipt_bytes=receipt_bytes, receipt_s=receipt_s)

    def _round_event(
        self,
        r: int,
        rounds: Sequence[ShardRound],
        *,
        stale_steps: int,
        verdict: Verdict,
        credit: Credit,
        val_loss: float | None,
        shards: int,
    ) -> PeerRound:
        """The round's event: what was trained, sent, received and credited (the CLI's status line reads it)."""
        work = rounds[0].sent.work  # the round's tokens, steps and losses, the same in every shard's
        uploads = [part.sent.transfer for part in rounds]
        downloads = [part.transfer for part in rounds]
        return PeerRound(
            round=r,
            loss=work.mean_loss,
            val_loss=val_loss,
            tokens=work.tokens,
            inner_steps=work.inner_steps,
            stale_steps=stale_steps,
            tokens_per_s=work.tokens / work.compute_s if work.compute_s > 0 else 0.0,
            accepted=verdict.accepted,
            reason=verdict.reason,
            update=rounds[0].sent.digest.hex()[:16],
            bytes_up=sum(up.sent_bytes for up in uploads),
            state_bytes_served=self.tally.chunks_served_bytes,
            bytes_down=sum(down.sent_bytes + len(down.body) for down in downloads)
            + sum(len(up.body) for up in uploads)
            + credit.receipt_bytes,
            compute_s=work.compute_s,
            encode_s=sum(part.sent.work.encode_s for part in rounds),
            upload_s=self.pacer.upload_s,
            wait_s=max(down.wait_s for down in downloads),
            download_s=max(down.transfer_s for down in downloads),
            points=credit.points,
            receipt_s=credit.receipt_s,
            overlap=self.options.overlap,
            overlap_limit=self.pacer.limit,
            shards=shards,
        )
