"""Serving chunks of the state this peer holds to joiners, and saying on the DHT which state that is.

A joiner downloads the state from its aggregator and from every peer that holds the same shard at
the same version, so the aggregator's link is not the only way in (state_download.py on the other side).
"""

import asyncio
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
from potluck.protocol.state_chunks import ChunkRequest


class StateServer:
    """The chunks of this peer's master state, for joiners; the holder record that points them here."""

    def __init__(self, node: Node, identity: Identity, options: PeerOptions, *, tally: Tally) -> None:
        self.node = node
        self.identity = identity
        self.tally = tally
        # A peer in client mode cannot be dialled, so it never serves.
        self.serves = options.serve_state and not options.client_mode
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
        record = HolderRecord(
            holder=self.identity.public_key,
            libp2p_peer_id=self.node.p2p.peer_id.to_bytes(),
            maddrs=tuple(str(m) for m in (await self.node.p2p.get_visible_maddrs())[:MAX_MADDRS]),
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
