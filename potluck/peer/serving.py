"""Serving chunks of the state this peer holds to joiners, and saying on the DHT which state that is.

A joiner downloads the state from its aggregator and from every peer that holds the same shard at
the same version, so the aggregator's link is not the only way in (state_download.py on the other side).
"""

import asyncio
import logging
import time

from potluck.peer.options import PeerOptions
from potluck.peer.records import Master, Tally
from potluck.protocol.chunk_server import ChunkUnavailable, chunk_handler
from potluck.protocol.dht_schema import MAX_MADDRS
from potluck.protocol.envelope import payload_digest
from potluck.protocol.holder_records import HolderRecord, store_holder_record
from potluck.protocol.identity import Identity
from potluck.protocol.messages import CHUNK_HANDLER, encode_state_payload
from potluck.protocol.node import Node
from potluck.protocol.reachability import classify, ips_of
from potluck.protocol.state_chunks import ChunkRequest

logger = logging.getLogger(__name__)

LIST_PEERS_TIMEOUT_S = 5.0
MAX_PEERS_COMPARED = 64  # the aggregator is among the first few connections; enough to judge by


class StateServer:
    """The chunks of this peer's master state, for joiners; the holder record that points them here."""

    def __init__(self, node: Node, identity: Identity, options: PeerOptions, *, tally: Tally) -> None:
        self.node = node
        self.identity = identity
        self.tally = tally
        # A peer in client mode cannot be dialled, so it never serves.
        self.serves = options.serve_state and not options.client_mode
        self.join = options.join  # the aggregators' addresses: a public one seen from private addresses is NAT
        self.holding: Master | None = None  # the master state this peer serves chunks of; None before the first
        self._held: dict[int, tuple[int, bytes, bytes]] = {}  # shard -> (version, payload, its sha256), built lazily
        self._building = asyncio.Lock()

    async def start(self) -> None:
        """Answer chunk requests from now on (when this peer serves at all)."""
        if self.serves:
            await self.node.p2p.add_binary_stream_handler(
                CHUNK_HANDLER, chunk_handler(self.held_payload, on_served=self._served)
            )

    async def announce_holding(self, master: Master) -> None:
        """Say on the DHT which version of each shard this peer holds, so joiners can fetch chunks here."""
        self.holding = master
        current = {s.index: s.version for s in master.shards}
        self._held = {i: held for i, held in self._held.items() if current.get(i) == held[0]}  # free stale payloads
        if not self.serves:
            return
        maddrs = await self.node.p2p.get_visible_maddrs()
        if not await self._dialable(maddrs):
            return
        record = HolderRecord(
            holder=self.identity.public_key,
            libp2p_peer_id=self.node.p2p.peer_id.to_bytes(),
            maddrs=tuple(str(m) for m in maddrs[:MAX_MADDRS]),
            config_hash=master.cfg.config_hash,
            shards=tuple((s.index, s.version) for s in master.shards),
            timestamp_s=time.time(),
        )
        await store_holder_record(
            self.node.dht,
            record,
            self.identity,
            ttl_s=2 * master.cfg.round_deadline_s + 60,
            contributors={s.index: s.contributors for s in master.shards},
        )

    async def _dialable(self, maddrs: list[object]) -> bool:
        """Whether joiners could dial `maddrs`; when this peer appears to be behind NAT it stops serving, once.

        A holder record naming only addresses nobody outside can reach would send every joiner dialling
        in vain, so a peer with only private addresses that joined a public aggregator (or one on another
        private network) announces none. An aggregator joined by name is compared at the addresses p2pd
        is connected to; with none of those either there is nothing to compare with, and it serves.
        """
        remote = ips_of(self.join) or await self._connected_ips()
        verdict = classify(ips_of(maddrs), remote_ips=remote)
        if verdict.can_serve_state or not remote:
            return True
        logger.warning("not serving the state to joiners: %s; %s", verdict.detail, verdict.meaning)
        self.serves = False
        return False

    async def _connected_ips(self) -> list[str]:
        """The IPs of the nodes p2pd is connected to (the aggregator among them), or none when it cannot say."""
        from hivemind.p2p import P2PDaemonError  # the node's own: loaded with it

        try:
            peers = await asyncio.wait_for(self.node.p2p.list_peers(), LIST_PEERS_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, P2PDaemonError) as e:
            logger.info("cannot list this node's connections (%s)", e)
            return []
        return ips_of(a for info in peers[:MAX_PEERS_COMPARED] for a in info.addrs)

    async def held_payload(self, request: ChunkRequest) -> bytes:
        """The payload of the shard and version a chunk request names, if this peer holds exactly that state.

        The payload is built on the first request for a version; a round that closes meanwhile (the
        aggregate applied while it was built) makes it stale, and the asker goes to another holder.
        """
        master = self.holding
        shard = master.shards[request.shard] if master is not None and request.shard < len(master.shards) else None
        if master is None or shard is None or shard.version != request.version:
            raise ChunkUnavailable(f"this peer does not hold shard {request.shard} at version {request.version}")
        held = self._held.get(shard.index)
        if held is None or held[0] != request.version:
            async with self._building:
                held = self._held.get(shard.index)
                if held is None or held[0] != request.version:
                    params = {name: master.params[name] for name in shard.names}
                    payload = await asyncio.to_thread(
                        encode_state_payload, master.cfg, params=params, outer_state=shard.outer.state_dict()
                    )
                    if shard.version != request.version or self.holding is not master:
                        raise ChunkUnavailable("this peer's state moved on while it was being prepared")
                    held = (request.version, payload, payload_digest(payload))
                    self._held[shard.index] = held
        if held[2] != request.payload_sha256:
            raise ChunkUnavailable(f"this peer holds another state of shard {request.shard} at that version")
        return held[1]

    def _served(self, n: int) -> None:
        self.tally.chunks_served_bytes += n
        self.tally.bytes_up += n
