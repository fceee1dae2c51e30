"""The state an aggregator serves to joiners: its signed header, its payload, and the payload's chunk digests."""

import asyncio
import time
from dataclasses import dataclass

from potluck.aggregator_server.master import MasterState
from potluck.protocol.chunk_server import ChunkUnavailable
from potluck.protocol.config import RunConfig
from potluck.protocol.envelope import StateHeader, payload_digest, sign_state
from potluck.protocol.identity import Identity
from potluck.protocol.messages import encode_state_payload, pack_envelope
from potluck.protocol.state_chunks import ChunkRequest, chunk_bytes_for, chunk_digests, digests_sha256
from potluck.training.diloco import state_sha256

KEPT_STATES = 2  # versions a joiner can still fetch chunks of: one that began just before a round closed finishes


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedState:
    """One master version, ready to serve whole (potluck.state) or as a manifest and chunks."""

    version: int
    envelope: bytes  # the SignedState's wire bytes
    payload: bytes
    digests: tuple[bytes, ...]

    @property
    def payload_sha256(self) -> bytes:
        """The payload's sha256, which names this state in chunk requests."""
        return payload_digest(self.payload)

    def manifest_body(self) -> bytes:
        """The MANIFEST frame body: the signed header, then the chunk digests it commits to."""
        return pack_envelope(self.envelope, b"".join(self.digests))

    def state_body(self) -> bytes:
        """The STATE frame body: the signed header, then the whole payload."""
        return pack_envelope(self.envelope, self.payload)


def serve_state(cfg: RunConfig, master: MasterState, identity: Identity, *, shard: int) -> ServedState:
    """Encode, cut and sign `master`, shard `shard`'s state (slow for a big model: run it in a thread)."""
    payload = encode_state_payload(cfg, params=master.params, outer_state=master.outer_state)
    chunk_bytes = chunk_bytes_for(len(payload))
    digests = chunk_digests(payload, chunk_bytes)
    header = StateHeader(
        run_id=cfg.run_name,
        config_hash=cfg.config_hash,
        round=master.round,
        new_version=master.version,
        aggregator_public_key=identity.public_key,
        shard=shard,
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        chunk_bytes=chunk_bytes,
        chunks_sha256=digests_sha256(digests),
        state_sha256=state_sha256(master.params),
        timestamp_s=time.time(),
        density=master.density,
    )
    envelope = sign_state(header, identity).to_bytes()
    return ServedState(version=master.version, envelope=envelope, payload=payload, digests=tuple(digests))


class ServedStates:
    """The last KEPT_STATES master versions served, by payload sha256, each built once on first demand."""

    def __init__(self, cfg: RunConfig, identity: Identity, *, shard: int) -> None:
        self.cfg = cfg
        self.identity = identity
        self.shard = shard
        self._served: dict[bytes, ServedState] = {}  # payload sha256 -> a recent version, oldest first

    async def current(self, master: MasterState) -> ServedState:
        """`master` ready to serve (built in a worker thread the first time); older versions beyond KEPT_STATES go."""
        newest = next(reversed(self._served.values()), None)
        if newest is not None and newest.version == master.version:
            return newest
        served = await asyncio.to_thread(serve_state, self.cfg, master, self.identity, shard=self.shard)
        self._served[served.payload_sha256] = served
        while len(self._served) > KEPT_STATES:
            del self._served[next(iter(self._served))]
        return served

    def payload(self, request: ChunkRequest) -> bytes:
        """The payload a chunk request names, if it is one of the versions kept; ChunkUnavailable otherwise."""
        served = self._served.get(request.payload_sha256)
        if served is None or request.shard != self.shard or served.version != request.version:
            raise ChunkUnavailable(f"this aggregator does not serve shard {request.shard} v{request.version} now")
        return served.payload
