"""A standby aggregator: an exact copy of its primary's shard, ready to take the shard over when it goes.

A key listed after a shard's owner in ``aggregator_keys`` (protocol/shards.py) is that shard's standby.
It serves nothing and announces nothing while the primary is up: it downloads the primary's signed
state once, then applies every signed aggregate the primary publishes, exactly as peers do (training/replica.py),
and checkpoints the result. Its parameters and outer momentum are therefore the primary's,
bit for bit (the checksum in each aggregate says so), and a peer that switches to it needs no new state.

The primary is gone when it has not answered for `failover_after_s` and its DHT announcement is
missing or older than that (a live primary re-announces every few seconds). The standby then returns
its copy, and the server opens the next round on it and announces itself; peers that cannot reach the
primary find it on the DHT. What does not carry over: the primary's error-feedback residual for the
download codec (the standby starts with none) and its ledger (the standby's starts at the takeover).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from potluck.aggregator_server.master import MasterState
from potluck.events import Event, Followed, Following
from potluck.protocol.client import AggregatorLink, AggregatorRefused, AggregatorUnreachable
from potluck.protocol.config import RunConfig
from potluck.protocol.dht_schema import AGGREGATORS_KEY, AggregatorAnnouncement, parse_announcements
from potluck.protocol.envelope import EnvelopeError, SignedAggregate
from potluck.protocol.identity import fingerprint
from potluck.protocol.node import Node, dial
from potluck.protocol.wire import RefusalCode
from potluck.tasks import run_shapes
from potluck.training.diloco import OuterOptimizer
from potluck.training.replica import ReplicaError, apply_aggregate, check_state

logger = logging.getLogger(__name__)

RETRY_S = 1.0  # between attempts to reach the primary


@dataclass(frozen=True, kw_only=True, slots=True)
class Takeover:
    """The standby's copy when the primary went, and the peers the next round should wait for."""

    master: MasterState
    contributors: frozenset[bytes]  # the last followed aggregate's: alive, and about to send their next update


class Standby:
    """Follows one primary aggregator's shard; `await follow()` returns a Takeover, or None when the run is over."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        node: Node,
        own_key: bytes,
        primary: bytes,
        master: MasterState,
        failover_after_s: float,
        on_state: Callable[[MasterState, bytes | None], Awaitable[None]],
        on_event: Callable[[Event], None],
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.own_key = own_key
        self.primary = primary
        self.master = master
        self.failover_after_s = failover_after_s
        self.on_state = on_state  # a new copy and the aggregate body that made it (None: a downloaded state)
        self.on_event = on_event
        self.contributors: frozenset[bytes] = frozenset()
        self._link: AggregatorLink | None = None
        self._synced = False

    async def follow(self) -> Takeover | None:
        """Stay in step with the primary until the run ends (None) or the primary is gone (a Takeover)."""
        failing_since: float | None = None
        while self.master.round < self.cfg.rounds:
            try:
                link = self._link or await self._find_primary()
                if not self._synced:
                    await self._download(link)
                else:
                    await self._next_aggregate(link)
                failing_since = None
            except AggregatorUnreachable as e:
                self._link = None
                now = time.monotonic()
                failing_since = failing_since or now
                logger.info("standby: primary %s unreachable: %s", fingerprint(self.primary), e)
                if now - failing_since >= self.failover_after_s and not await self._primary_announced():
                    return Takeover(master=self.master, contributors=self.contributors)
                await asyncio.sleep(RETRY_S)
            except AggregatorRefused as e:
                if e.code is RefusalCode.RUN_FINISHED:
                    return None
                if e.code is RefusalCode.NOT_HELD:
                    self._synced = False  # fell behind by more than the primary keeps: download the state
                await asyncio.sleep(0 if e.code is RefusalCode.ROUND_OPEN else RETRY_S)
            except ReplicaError as e:
                logger.warning("standby: %s; downloading the primary's state again", e)
                self._synced = False
        return None

    async def _find_primary(self) -> AggregatorLink:
        announcement = await self._announcement()
        if announcement is None:
            raise AggregatorUnreachable(f"primary {fingerprint(self.primary)} is not announced on the DHT")
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        peer_id = PeerID(announcement.libp2p_peer_id)
        await dial(self.node.p2p, peer_id, [Multiaddr(m) for m in announcement.maddrs])
        self._link = AggregatorLink(self.node.p2p, peer_id)
        return self._link

    async def _announcement(self) -> AggregatorAnnouncement | None:
        """The primary's announcement for this run on the DHT, or None."""
        try:
            found = parse_announcements(await self.node.dht.get(AGGREGATORS_KEY, latest=True))
        except Exception as e:  # noqa: BLE001 - a DHT lookup that fails tells nothing about the primary
            logger.debug("standby: DHT lookup failed: %s", e)
            return None
        mine = [a for a in found if a.public_key == self.primary and a.config_hash == self.cfg.config_hash]
        return max(mine, key=lambda a: a.timestamp_s, default=None)

    async def _primary_announced(self) -> bool:
        """Whether the primary re-announced itself within failover_after_s (it may only be unreachable from here)."""
        announcement = await self._announcement()
        return announcement is not None and time.time() - announcement.timestamp_s < self.failover_after_s

    async def _download(self, link: AggregatorLink) -> None:
        signed, payload, _ = await link.fetch_state(self.own_key)
        state = await asyncio.to_thread(check_state, signed, payload, source=self.primary, shapes_of=run_shapes)
        if state.cfg.config_hash != self.cfg.config_hash:
            raise ReplicaError("the primary serves another run config")
        h = state.header
        self.master = MasterState(
            round=h.round,
            version=h.new_version,
            params=state.params,
            outer_state=state.outer.state_dict(),
            residual={},
            density=h.density,
        )
        self._synced = True
        await self.on_state(self.master, None)
        self.on_event(Following(round=h.round, primary=fingerprint(self.primary)))

    async def _next_aggregate(self, link: AggregatorLink) -> None:
        r = self.master.round
        try:
            signed, payload, transfer = await link.fetch_aggregate(r, timeout_s=2 * self.cfg.round_deadline_s + 60)
        except EnvelopeError as e:
            raise ReplicaError(f"the primary's aggregate does not parse: {e}") from e
        following = await asyncio.to_thread(self._applied, signed, payload)
        self.master = following
        self.contributors = frozenset(key for key, _ in signed.header.contributors)
        await self.on_state(following, transfer.body)
        self.on_event(Followed(round=r, state_sha256=signed.header.state_sha256.hex()))

    def _applied(self, signed: SignedAggregate, payload: bytes) -> MasterState:
        """The copy after the aggregate, built aside: a failed check leaves the current copy as it was."""
        master, cfg = self.master, self.cfg
        params = {name: t.clone() for name, t in master.params.items()}
        outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
        outer.load_state_dict(master.outer_state)
        apply_aggregate(
            signed,
            payload,
            cfg=cfg,
            source=self.primary,
            round_index=master.round,
            density=master.density,
            params=params,
            outer=outer,
        )
        h = signed.header
        return MasterState(
            round=h.round + 1,
            version=h.new_version,
            params=params,
            outer_state=outer.state_dict(),
            residual={},
            density=h.next_density,
        )
