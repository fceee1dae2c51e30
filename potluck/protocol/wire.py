"""Framing for messages carried over hivemind's libp2p binary streams: magic, version, kind, bounded length.

A frame is a 13-byte header, then the body:

    b"PLK" | u8 protocol version | u8 MessageKind | u64 big-endian body length | body

Why not hivemind's `P2P.send_raw_data` / `receive_raw_data`: the latter does
`reader.readexactly(<peer-supplied 8-byte length>)`, so one hostile header makes the node allocate
whatever the peer declares. Here the reader checks magic, version, kind and the declared length
against the caller's `max_body_bytes` *before* it reads or allocates any body byte.

How hivemind hands out streams (`hivemind/p2p/p2p_daemon.py`, 1.1.12): a handler registered with
`await p2p.add_binary_stream_handler(name, handler)` is called as
`handler(stream_info, reader, writer)` with an `asyncio.StreamReader` / `asyncio.StreamWriter` pair
(a Unix socket to the local p2pd, which pipes one libp2p stream); the caller gets the same pair from
`await p2p.call_binary_stream_handler(peer_id, name) -> (stream_info, reader, writer)`. So the
natural API is `read_frame_from_stream(reader, ...)` and `write_frame(writer, ...)`. `read_frame`
does the same over any async iterator of byte chunks, so the format is testable without a network.

Each message is exactly one frame; a conversation is request frame, then reply frame (or an ERROR
frame) on the same stream. An ERROR frame's body is one RefusalCode byte, then one line of text for
people: what the receiver does follows the code, never the wording. `read_frame_from_stream` never
reads past its frame. `read_frame` over chunks treats bytes after the frame in the same chunk as a
protocol violation (a peer that sends more than one frame where one is expected is broken or
hostile), and it never pulls another chunk once the frame is complete, so it does not block on a
live stream.

Deadlines: given `deadlines`, the stream functions bound every step (the header, each piece of a body,
the whole body by its size) and raise TimeoutError past one; a write that times out aborts the stream,
so a peer that never reads what it asked for frees the writer at once. Without `deadlines` they wait as
long as the peer takes: the caller then wraps them in `asyncio.wait_for` (a client waiting on a long-poll).
"""

import asyncio
import struct
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass
from enum import IntEnum

from potluck.errors import PotluckError
from potluck.protocol import PROTOCOL_VERSION, UPGRADE_HINT

MAGIC = b"PLK"
_HEADER = struct.Struct(">3sBBQ")  # magic, protocol version, message kind, body length
HEADER_BYTES = _HEADER.size  # 13
# 256 KiB per write: large enough that per-chunk overhead is negligible, small enough that drain()
# applies backpressure long before a multi-GB state download sits in the socket buffer.
DEFAULT_CHUNK_BYTES = 256 * 1024
MAX_ERROR_BODY_BYTES = 1024  # an ERROR frame carries its code byte and one line of text, never more


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long a stream may take over each step; the defaults suit a volunteer's link down to ~128 kbit/s."""

    head_s: float = 10.0  # from the stream's start to a whole frame header (and a small request's body)
    stall_s: float = 10.0  # the longest a body may go without a byte moving, either way
    floor_s: float = 10.0  # the least time any body gets, whatever its size
    # the slowest rate a body may average before its stream is dropped: low, because an honest server's link
    # is shared by every peer it sends an aggregate to at once; the stall limit is what frees slots quickly
    min_bytes_per_s: float = 16 * 1024

    def __post_init__(self) -> None:
        if min(self.head_s, self.stall_s, self.floor_s, self.min_bytes_per_s) <= 0:
            raise ValueError(f"every deadline and the minimum rate must be positive, got {self}")

    def body_s(self, body_bytes: int) -> float:
        """The deadline for a body of `body_bytes` (read or written): the floor, plus its size at the minimum rate."""
        return self.floor_s + body_bytes / self.min_bytes_per_s

    def piece_bytes(self) -> int:
        """How much one write hands the stream before it waits: small enough to drain within `stall_s` at the
        minimum rate, so a slow honest reader is never taken for one that stopped."""
        return max(4096, min(DEFAULT_CHUNK_BYTES, int(self.stall_s * self.min_bytes_per_s / 2)))


DEFAULT_DEADLINES = Deadlines()


class RefusalCode(IntEnum):
    """Why a node refused a request, carried in the ERROR frame beside the message. Wire bytes: only append.

    A receiver branches on this; the message is for people and may be reworded freely. A code this
    node does not know reads as UNSPECIFIED: the request failed, for no reason the receiver acts on.
    """

    UNSPECIFIED = 0  # no reason a receiver should act on (and what an unknown code reads as)
    BUSY = 1  # the node is at its limit (uploads, probes, chunk streams, rate cap): ask again later or elsewhere
    RUN_FINISHED = 2  # the run has finished: there is nothing more to ask for
    ROUND_OPEN = 3  # the round asked about is still open: ask again
    NOT_HELD = 4  # the node no longer holds (or never held) what was asked: download the state again, or ask another
    NOT_STARTED = 5  # the round asked about has not started yet
    NOT_FOUND = 6  # the node has no record of what was asked (a receipt for an update its ledger lacks)
    BAD_REQUEST = 7  # the request was malformed or oversize: asking again the same way fails the same way
    VERSION_MISMATCH = 8  # the request is from another protocol version
    INTERNAL = 9  # the node failed on its side (a bug or a broken disk there)


class WireError(PotluckError):
    """A frame is malformed, truncated, oversize, of the wrong kind or from another protocol version (one line)."""


class VersionMismatchError(WireError):
    """The peer's frame is from another protocol version; `theirs` is its version."""

    def __init__(self, theirs: int) -> None:
        super().__init__(_version_message(theirs))
        self.theirs = theirs

    def reply(self) -> str:
        """The refusal to send back, phrased for the other side: both versions and who must upgrade."""
        fix = (
            UPGRADE_HINT if self.theirs < PROTOCOL_VERSION else "this node must upgrade potluck before you can use it"
        )
        return f"this node speaks protocol v{PROTOCOL_VERSION}, you sent v{self.theirs}; {fix}"


class PeerRefusedError(WireError):
    """The peer answered with an ERROR frame: `code` says why, `reason` is its (sanitised) line for people."""

    def __init__(self, message: str, *, code: RefusalCode = RefusalCode.UNSPECIFIED, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class MessageKind(IntEnum):
    """What a frame's body is. Values are wire bytes: never renumber, only append."""

    STATE_REQUEST = 1  # peer -> aggregator: send me the run config, model and optimizer state
    STATE = 2  # aggregator -> peer: the signed full state (reply to STATE_REQUEST)
    SUBMIT = 3  # peer -> aggregator: one SignedUpdate envelope + codec payload
    SUBMIT_REPLY = 4  # aggregator -> peer: accepted (with a signed receipt) or rejected with a reason
    AGGREGATE_REQUEST = 5  # peer -> aggregator: send me the aggregate of round N
    AGGREGATE = 6  # aggregator -> peer: a SignedAggregate envelope + encoded aggregate
    ERROR = 7  # either side: the request was refused; the body is a RefusalCode byte and one line of UTF-8 text
    PROBE = 8  # doctor -> aggregator: timing probe; the body is uploaded bytes, msgpack {"reply_bytes": n} first
    PROBE_REPLY = 9  # aggregator -> doctor: reply_bytes bytes, for a download-rate measurement
    RECEIPT_REQUEST = 10  # peer -> aggregator: the final receipt of my update in round N
    RECEIPT = 11  # aggregator -> peer: a SignedReceipt from the ledger, with its Merkle inclusion proof
    MANIFEST_REQUEST = 12  # joiner -> aggregator: the signed state header and its chunk digests (STATE_REQUEST body)
    MANIFEST = 13  # aggregator -> joiner: SignedState envelope + the chunk digests it commits to
    CHUNK_REQUEST = 14  # joiner -> any holder: one chunk of one state (state_chunks.ChunkRequest)
    CHUNK = 15  # holder -> joiner: the chunk's bytes, checked by the joiner against the manifest


def _version_message(theirs: int) -> str:
    fix = UPGRADE_HINT if theirs > PROTOCOL_VERSION else "the peer must upgrade potluck"
    return f"peer speaks protocol v{theirs}, this node speaks v{PROTOCOL_VERSION}; {fix}"


def encode_header(kind: MessageKind, body_bytes: int) -> bytes:
    """The 13 header bytes of a frame whose body is `body_bytes` long."""
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageKind(kind), body_bytes)


def encode_frame(kind: MessageKind, body: bytes) -> bytes:
    """One whole frame as bytes (copies the body; use `frame_chunks` to stream large bodies)."""
    return encode_header(kind, len(body)) + bytes(body)


def frame_chunks(
    kind: MessageKind, body: bytes, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes | memoryview]:
    """The frame as the header, then body slices of at most `chunk_bytes` (memoryviews: no copy)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    yield encode_header(kind, len(body))
    view = memoryview(body)
    for offset in range(0, len(view), chunk_bytes):
        yield view[offset : offset + chunk_bytes]


def error_body(message: str, *, code: RefusalCode) -> bytes:
    """An ERROR frame's body: the code's byte, then the message's first line in UTF-8, cut to MAX_ERROR_BODY_BYTES."""
    first_line = message.splitlines()[0] if message else ""
    return bytes([RefusalCode(code)]) + first_line.encode("utf-8")[: MAX_ERROR_BODY_BYTES - 1]


def decode_error(body: bytes) -> tuple[RefusalCode, str]:
    """An ERROR frame's (code, printable one-line reason); never raises: an unknown or missing code is UNSPECIFIED.

    The body is already bounded by MAX_ERROR_BODY_BYTES (decode_header checks it before it is read).
    """
    try:
        code = RefusalCode(body[0]) if body else RefusalCode.UNSPECIFIED
    except ValueError:  # a newer or hostile node's code: the request failed, for no reason this node acts on
        code = RefusalCode.UNSPECIFIED
    text = bytes(body[1:]).decode("utf-8", errors="replace")
    return code, "".join(ch if ch.isprintable() else "?" for ch in text)  # untrusted text: keep it one line


def _peer_error(body: bytes) -> PeerRefusedError:
    code, reason = decode_error(body)
    return PeerRefusedError(f"peer refused the request: {reason}", code=code, reason=reason)


def decode_header(
    header: bytes | bytearray, *, max_body_bytes: int, expected_kinds: Collection[MessageKind]
) -> tuple[MessageKind, int]:
    """Check a 13-byte header and return (kind, body length); raises WireError before any body is read.

    An ERROR frame is always accepted (its body capped at MAX_ERROR_BODY_BYTES), so a refusal reaches
    the caller whatever it expected; the frame readers raise it as PeerRefusedError unless ERROR is
    in `expected_kinds`.
    """
    if len(header) != HEADER_BYTES:
        raise WireError(f"frame header must be {HEADER_BYTES} bytes, got {len(header)}")
    magic, version, kind_byte, body_bytes = _HEADER.unpack(header)
    if magic != MAGIC:
        raise WireError(f"not a potluck frame (magic {magic!r}, expected {MAGIC!r}); is the peer a potluck node?")
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(version)
    try:
        kind = MessageKind(kind_byte)
    except ValueError:
        raise WireError(f"unknown message kind {kind_byte} from a v{version} peer") from None
    limit = min(max_body_bytes, MAX_ERROR_BODY_BYTES) if kind is MessageKind.ERROR else max_body_bytes
    if kind is not MessageKind.ERROR and kind not in expected_kinds:
        expected = ", ".join(sorted(k.name for k in expected_kinds)) or "nothing"
        raise WireError(f"unexpected message kind {kind.name} (expected {expected})")
    if body_bytes > limit:
        raise WireError(f"peer declares a {body_bytes}-byte {kind.name} body, over this node's limit of {limit} bytes")
    return kind, body_bytes


def _finish(kind: MessageKind, body: bytes, expected_kinds: Collection[MessageKind]) -> tuple[MessageKind, bytes]:
    if kind is MessageKind.ERROR and MessageKind.ERROR not in expected_kinds:
        raise _peer_error(body)
    return kind, body


async def read_frame(
    chunks: AsyncIterator[bytes], *, max_body_bytes: int, expected_kinds: Collection[MessageKind]
) -> tuple[MessageKind, bytes]:
    """Read one frame from an async iterator of byte chunks (any split, down to 1-byte chunks).

    The magic is checked as soon as its bytes arrive, the header before any body byte is pulled, and
    the body buffer never grows past the declared length. Raises WireError on a bad header, on a
    stream that ends early, and on bytes after the frame within its last chunk.
    """
    header = bytearray()
    body = bytearray()
    body_bytes = None
    kind = MessageKind.ERROR
    async for chunk in chunks:
        if body_bytes is None:
            take = HEADER_BYTES - len(header)
            header += chunk[:take]
            chunk = chunk[take:]
            if header[: len(MAGIC)] != MAGIC[: len(header)]:
                raise WireError(f"not a potluck frame (starts {bytes(header[:3])!r}); is the peer a potluck node?")
            if len(header) < HEADER_BYTES:
                continue
            kind, body_bytes = decode_header(header, max_body_bytes=max_body_bytes, expected_kinds=expected_kinds)
        extra = len(body) + len(chunk) - body_bytes
        if extra > 0:
            raise WireError(f"{extra} bytes after the {kind.name} frame; one frame per message expected")
        body += chunk
        if len(body) == body_bytes:
            return _finish(kind, bytes(body), expected_kinds)
    if body_bytes is None:
        raise WireError(f"stream ended inside the frame header ({len(header)} of {HEADER_BYTES} bytes)")
    raise WireError(f"stream ended after {len(body)} of {body_bytes} {kind.name} body bytes")


async def read_frame_head(
    reader: asyncio.StreamReader,
    *,
    max_body_bytes: int,
    expected_kinds: Collection[MessageKind],
    deadlines: Deadlines | None = None,
) -> tuple[MessageKind, int]:
    """Read and check one frame's 13-byte header: (kind, declared body length), within `deadlines.head_s` if given.

    A server reads the head before it decides anything (a "busy" refusal included), so every asker
    hears why it was refused instead of finding its stream closed.
    """
    header = await (
        _read_header(reader) if deadlines is None else asyncio.wait_for(_read_header(reader), deadlines.head_s)
    )
    return decode_header(header, max_body_bytes=max_body_bytes, expected_kinds=expected_kinds)


async def _read_header(reader: asyncio.StreamReader) -> bytes:
    magic = b""
    try:
        magic = await reader.readexactly(len(MAGIC))
        if magic != MAGIC:  # checked first, so a stray protocol fails fast
            raise WireError(f"not a potluck frame (starts {magic!r}); is the peer a potluck node?")
        return magic + await reader.readexactly(HEADER_BYTES - len(MAGIC))
    except asyncio.IncompleteReadError as e:
        got = len(magic) + len(e.partial)
        raise WireError(f"stream ended inside the frame header ({got} of {HEADER_BYTES} bytes)") from None


async def read_frame_body(
    reader: asyncio.StreamReader,
    kind: MessageKind,
    body_bytes: int,
    *,
    expected_kinds: Collection[MessageKind],
    deadlines: Deadlines | None = None,
) -> tuple[MessageKind, bytes]:
    """Read the body a checked head declared (`body_bytes`, already bounded); with `deadlines`, piece by piece.

    With deadlines, no piece may take over `stall_s` and the whole body no longer than `body_s(body_bytes)`:
    a peer that declares a large body and sends nothing loses its stream after `stall_s`.
    """
    try:
        if deadlines is None:
            body = await reader.readexactly(body_bytes)  # bounded: body_bytes <= the caller's limit
        else:
            body = await asyncio.wait_for(_read_paced(reader, body_bytes, deadlines), deadlines.body_s(body_bytes))
    except asyncio.IncompleteReadError as e:
        raise WireError(f"stream ended after {len(e.partial)} of {body_bytes} {kind.name} body bytes") from None
    return _finish(kind, body, expected_kinds)


async def _read_paced(reader: asyncio.StreamReader, body_bytes: int, deadlines: Deadlines) -> bytes:
    body = bytearray()
    while len(body) < body_bytes:
        piece = await asyncio.wait_for(
            reader.read(min(body_bytes - len(body), DEFAULT_CHUNK_BYTES)), deadlines.stall_s
        )
        if not piece:
            raise asyncio.IncompleteReadError(bytes(body), body_bytes)
        body += piece
    return bytes(body)


async def read_frame_from_stream(
    reader: asyncio.StreamReader,
    *,
    max_body_bytes: int,
    expected_kinds: Collection[MessageKind],
    deadlines: Deadlines | None = None,
) -> tuple[MessageKind, bytes]:
    """Read one frame from a hivemind stream reader, never past its end; same checks as `read_frame`."""
    kind, body_bytes = await read_frame_head(
        reader, max_body_bytes=max_body_bytes, expected_kinds=expected_kinds, deadlines=deadlines
    )
    return await read_frame_body(reader, kind, body_bytes, expected_kinds=expected_kinds, deadlines=deadlines)


async def write_frame(
    writer: asyncio.StreamWriter,
    *,
    kind: MessageKind,
    body: bytes,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    deadlines: Deadlines | None = None,
) -> None:
    """Send one frame on a hivemind stream writer, draining after each chunk (backpressure, bounded buffers).

    With `deadlines`, each drain must finish within `stall_s` and the whole frame within `body_s(len(body))`;
    past either the stream is aborted (what is still buffered is dropped) and TimeoutError raised.
    """
    try:
        if deadlines is None:
            await _write(writer, kind, body, chunk_bytes, None)
        else:
            piece = min(chunk_bytes, deadlines.piece_bytes())
            await asyncio.wait_for(_write(writer, kind, body, piece, deadlines.stall_s), deadlines.body_s(len(body)))
    except (TimeoutError, asyncio.TimeoutError):
        abort(writer)
        raise


async def _write(
    writer: asyncio.StreamWriter, kind: MessageKind, body: bytes, chunk_bytes: int, stall_s: float | None
) -> None:
    for chunk in frame_chunks(kind, body, chunk_bytes=chunk_bytes):
        writer.write(chunk)
        await (writer.drain() if stall_s is None else asyncio.wait_for(writer.drain(), stall_s))


def abort(writer: asyncio.StreamWriter) -> None:
    """Drop a stream at once, with whatever is still buffered for it: a peer that stopped reading gets nothing more."""
    transport = getattr(writer, "transport", None)
    if transport is not None:
        transport.abort()
    else:
        writer.close()
