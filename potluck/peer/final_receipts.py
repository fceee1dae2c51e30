"""The final receipts of this peer's updates: fetched once their round closed, checked, kept, and counted.

A receipt on arrival says an update was received; the final receipt of a closed round says whether it
counted and what it earned, under the aggregator's signature and a Merkle proof to the signed aggregate.
An update accepted late counts in the next round: its receipt is settled when that round closes.
"""

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from potluck.events import Event, ReceiptInvalid, ReceiptReceived
from potluck.incentives.receipts import ReceiptError, check_receipt, store_receipt
from potluck.peer.records import Shard, Tally
from potluck.protocol.client import AggregatorRefused, AggregatorUnreachable
from potluck.protocol.envelope import SignedAggregate
from potluck.protocol.identity import Identity

logger = logging.getLogger(__name__)


class FinalReceipts:
    """Collects and checks the final receipts of this peer's counted updates, on time or late."""

    def __init__(
        self, identity: Identity, *, receipts_dir: Path | None, tally: Tally, on_event: Callable[[Event], None]
    ) -> None:
        self.identity = identity
        self.receipts_dir = receipts_dir  # where they are kept (None: checked, not kept)
        self.tally = tally
        self.on_event = on_event
        self._late: dict[int, tuple[int, bytes]] = {}  # shard -> (round it counts in, digest) of an update taken late

    def note_late(self, shard: int, *, counts_in: int, digest: bytes) -> None:
        """Remember an update of `shard` accepted into a later round: its receipt comes when that round closes."""
        self._late[shard] = (counts_in, digest)

    async def settle_late(self, r: int, shard: Shard, aggregate: SignedAggregate) -> float | None:
        """Count the late update that `shard`'s round `r` took in (if any) and keep its receipt; its points."""
        late = self._late.get(shard.index)
        if late is None or late[0] != r:
            return None
        _, digest = self._late.pop(shard.index)
        counted = self.identity.public_key in dict(aggregate.header.contributors)
        if shard.index == 0:  # one late round, however many shards it was cut into
            self.tally.accepted += counted
            self.tally.rejected += not counted
        if not counted:
            logger.warning("round %d: the late update it took in was dropped at round close", r)
            return None
        points, _, _ = await self.collect(shard, r, digest, aggregate)
        return points

    async def collect(
        self, shard: Shard, round_index: int, digest: bytes, aggregate: SignedAggregate
    ) -> tuple[float | None, int, float]:
        """Fetch this round's final receipt from the shard's aggregator, check it (signature, Merkle proof), keep it.

        Returns (its points or None, bytes received, seconds taken). Never fatal: a missing or bad
        receipt is logged and reported as an event.
        """
        started = time.perf_counter()
        try:
            signed, t = await shard.link.fetch_receipt(round_index, digest)
        except (AggregatorUnreachable, AggregatorRefused) as e:
            logger.warning("round %d: no final receipt: %s", round_index, e)
            return None, 0, time.perf_counter() - started
        self.tally.bytes_down += len(t.body)
        self.tally.bytes_up += t.sent_bytes
        r = signed.receipt
        problem = check_receipt(signed, aggregate, aggregator_key=shard.key)
        if problem is None and (r.update_sha256, r.round) != (digest, round_index):
            problem = "it answers another update"
        if problem is not None:
            logger.warning("round %d: the aggregator's final receipt does not verify: %s", round_index, problem)
            self.on_event(ReceiptInvalid(round=round_index, detail=problem))
            return None, len(t.body), time.perf_counter() - started
        if self.receipts_dir is not None:
            try:
                await asyncio.to_thread(store_receipt, self.receipts_dir, signed, aggregate)
            except ReceiptError as e:
                logger.warning("round %d: %s", round_index, e)
        self.tally.receipts += r.accepted
        self.tally.score += r.score
        self.on_event(
            ReceiptReceived(
                round=round_index,
                accepted=r.accepted,
                tokens_credited=r.tokens_credited,
                score=r.score,
                reason=r.reason,
                update=digest.hex()[:16],
                shard=shard.index,
            )
        )
        return r.score, len(t.body), time.perf_counter() - started


def total_points(points: Sequence[float | None]) -> float | None:
    """The sum of the points given, None when none was credited."""
    credited = [p for p in points if p is not None]
    return math.fsum(credited) if credited else None
