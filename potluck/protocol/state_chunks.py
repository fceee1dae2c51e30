"""State from many sources: the chunk manifest an aggregator signs, and the request that fetches one chunk.

An aggregator cuts its state payload into chunks of `chunk_bytes` and signs, in its StateHeader, the
sha256 of the chunks' own sha256s (`chunks_sha256`). A joiner fetches that header and the chunk digests
from the aggregator (the manifest, a few KiB), then the chunks from any holder of the same state: the
aggregator, and peers that follow the run and hold the same shard at the same version. Each chunk is
checked against its digest on arrival, so a bad donor's chunk is refused and fetched elsewhere, and no
one donor serves a whole state to every joiner.
"""

import hashlib
import math
from dataclasses import dataclass

import msgpack

from potluck.errors import PotluckError
from potluck.protocol.envelope import StateHeader

MIN_CHUNK_BYTES = 64 * 2**10
MAX_CHUNK_BYTES = 4 * 2**20
TARGET_CHUNKS = 16  # enough pieces for a joiner to spread even a small state over several donors
SHA256_BYTES = 32
_DOMAIN = b"potluck/state-chunks/v1\0"
_MAX_REQUEST_BYTES = 256


class ChunkError(PotluckError):
    """A manifest or chunk request that is malformed or does not match what was signed (one line)."""


def chunk_bytes_for(payload_bytes: int) -> int:
    """The chunk size an aggregator cuts a payload of `payload_bytes` into: about TARGET_CHUNKS pieces, bounded."""
    wanted = math.ceil(payload_bytes / TARGET_CHUNKS)
    return min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, wanted))


def chunk_count(payload_bytes: int, chunk_bytes: int) -> int:
    """How many chunks a payload of `payload_bytes` makes (the last one may be short)."""
    return max(1, math.ceil(payload_bytes / chunk_bytes))


def chunk_digests(payload: bytes, chunk_bytes: int) -> list[bytes]:
    """The sha256 of each `chunk_bytes` slice of `payload`, in order."""
    view = memoryview(payload)
    count = chunk_count(len(payload), chunk_bytes)
    return [hashlib.sha256(view[i * chunk_bytes : (i + 1) * chunk_bytes]).digest() for i in range(count)]


def digests_sha256(digests: list[bytes]) -> bytes:
    """What a StateHeader signs of its chunk digests: one sha256 over all of them, domain-separated."""
    return hashlib.sha256(_DOMAIN + b"".join(digests)).digest()


def max_digest_bytes(max_payload_bytes: int) -> int:
    """The longest digest list a manifest of a payload of at most `max_payload_bytes` can carry."""
    return chunk_count(max_payload_bytes, MIN_CHUNK_BYTES) * SHA256_BYTES


def check_manifest(header: StateHeader, digest_bytes: bytes) -> list[bytes]:
    """The chunk digests a (verified) state header commits to, once `digest_bytes` matches its commitment."""
    size = header.chunk_bytes
    if not MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES:
        raise ChunkError(f"manifest chunk size {size} is outside [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}] bytes")
    count = chunk_count(header.payload_bytes, size)
    if len(digest_bytes) != count * SHA256_BYTES:
        raise ChunkError(f"manifest lists {len(digest_bytes) // SHA256_BYTES} chunk digests, its header {count}")
    digests = [digest_bytes[i : i + SHA256_BYTES] for i in range(0, len(digest_bytes), SHA256_BYTES)]
    if digests_sha256(digests) != header.chunks_sha256:
        raise ChunkError("manifest's chunk digests do not match the ones its aggregator signed")
    return digests


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkRequest:
    """One chunk of one state: shard `shard` at `version`, the payload whose sha256 is `payload_sha256`."""

    shard: int
    version: int
    payload_sha256: bytes
    chunk_bytes: int
    index: int

    def to_bytes(self) -> bytes:
        """The CHUNK_REQUEST body (a small msgpack map)."""
        return msgpack.packb(
            {
                "shard": self.shard,
                "version": self.version,
                "payload": self.payload_sha256,
                "chunk_bytes": self.chunk_bytes,
                "index": self.index,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, body: bytes) -> "ChunkRequest":
        """Parse and bound a CHUNK_REQUEST body; ChunkError for anything else."""
        if len(body) > _MAX_REQUEST_BYTES:
            raise ChunkError(f"chunk request is {len(body)} bytes, over the {_MAX_REQUEST_BYTES}-byte limit")
        try:
            request = msgpack.unpackb(body, raw=False, max_map_len=5, max_str_len=16, max_bin_len=32, max_array_len=0)
        except Exception as e:  # msgpack raises many types on garbage
            raise ChunkError(f"chunk request is not valid msgpack ({type(e).__name__})") from e
        keys = ("shard", "version", "payload", "chunk_bytes", "index")
        if not isinstance(request, dict) or set(request) != set(keys):
            raise ChunkError(f"chunk request must be a map of exactly {', '.join(keys)}")
        counts = [request[k] for k in ("shard", "version", "chunk_bytes", "index")]
        if not all(type(v) is int and 0 <= v < 2**63 for v in counts):
            raise ChunkError("chunk request's shard, version, chunk_bytes and index must be non-negative integers")
        payload = request["payload"]
        if not isinstance(payload, bytes) or len(payload) != SHA256_BYTES:
            raise ChunkError("chunk request's payload must be a 32-byte sha256")
        if not MIN_CHUNK_BYTES <= request["chunk_bytes"] <= MAX_CHUNK_BYTES:
            raise ChunkError(f"chunk request's chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
        return cls(
            shard=request["shard"],
            version=request["version"],
            payload_sha256=payload,
            chunk_bytes=request["chunk_bytes"],
            index=request["index"],
        )


def chunk_of(payload: bytes, request: ChunkRequest) -> bytes:
    """The requested slice of `payload` (the caller has checked it is the payload asked for); ChunkError if none.

    The slice size is the manifest's (`chunk_bytes_for` the payload), never the asker's choice: a request
    for another size is refused, so no one can make a holder send more per reply than the protocol says.
    """
    size = chunk_bytes_for(len(payload))
    if request.chunk_bytes != size:
        raise ChunkError(f"chunk request asks for {request.chunk_bytes}-byte chunks; this state's manifest has {size}")
    count = chunk_count(len(payload), request.chunk_bytes)
    if request.index >= count:
        raise ChunkError(f"chunk {request.index} asked of a state of {count} chunks")
    return payload[request.index * request.chunk_bytes : (request.index + 1) * request.chunk_bytes]
