"""potluck's bandwidth probe on the wire: the request's layout and the client that measures a link with it.

A volunteer's first question is "is my link good enough?"; the honest answer is measured against the
aggregator they will actually talk to, over the same libp2p path their updates will take. The probe is
one request frame and one reply frame on a binary stream named PROBE_HANDLER (see `protocol/wire.py`):

    PROBE body       = u32 big-endian header length | msgpack header {"reply_bytes": n} | filler bytes
    PROBE_REPLY body = n zero bytes

The filler is what the client uploads (its length is the frame's body length minus the header); `n` is
what it asks to download. Both are bounded by MAX_PROBE_BYTES. The server's handler is
`potluck.aggregator_server.probe_handler.handle_probe`; the clients are `potluck doctor`, `potluck plan --auto`
and a peer's start-up plan (`potluck peer --plan`).
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from typing import TYPE_CHECKING, Any

import msgpack

from potluck.errors import PotluckError
from potluck.protocol.wire import (
    HEADER_BYTES,
    MessageKind,
    PeerRefusedError,
    WireError,
    decode_error,
    decode_header,
    write_frame,
)

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

__all__ = [
    "MAX_PROBE_BYTES",
    "PROBE_HANDLER",
    "ProbeUnavailableError",
    "daemon_reason",
    "decode_probe_request",
    "encode_probe_request",
    "measure_rates",
]

PROBE_HANDLER = "potluck.probe"
# 8 MiB each way: about 7 s of upload at 10 Mbit/s, enough for a stable rate on a home link while keeping
# what one probe can cost the aggregator small.
MAX_PROBE_BYTES = 8 * 1024 * 1024
_LENGTH = struct.Struct(">I")  # length of the msgpack header that follows
MAX_PROBE_HEADER_BYTES = 256  # {"reply_bytes": n} packs to under 20 bytes; anything far bigger is not ours
_MIN_TRANSFER_S = 1e-6  # a floor so a sub-microsecond localhost transfer does not divide by zero


class ProbeUnavailableError(PotluckError):
    """The peer answers but does not serve potluck's probe handler (not an aggregator, or an older one)."""


def encode_probe_request(*, upload_bytes: int, reply_bytes: int) -> bytes:
    """A PROBE body that uploads `upload_bytes` filler bytes and asks for `reply_bytes` back."""
    for name, value in (("upload_bytes", upload_bytes), ("reply_bytes", reply_bytes)):
        if not 0 <= value <= MAX_PROBE_BYTES:
            raise ValueError(f"{name} must be between 0 and {MAX_PROBE_BYTES}, got {value}")
    header = msgpack.packb({"reply_bytes": reply_bytes})
    return _LENGTH.pack(len(header)) + header + bytes(upload_bytes)


def decode_probe_request(body: bytes) -> int:
    """The `reply_bytes` a PROBE body asks for; raises WireError (one line) on anything malformed."""
    if len(body) < _LENGTH.size:
        raise WireError(f"probe request of {len(body)} bytes is shorter than its {_LENGTH.size}-byte length prefix")
    (header_bytes,) = _LENGTH.unpack_from(body)
    if header_bytes > MAX_PROBE_HEADER_BYTES or _LENGTH.size + header_bytes > len(body):
        raise WireError(f"probe header length {header_bytes} is over {MAX_PROBE_HEADER_BYTES} or past the body end")
    try:
        header: Any = msgpack.unpackb(body[_LENGTH.size : _LENGTH.size + header_bytes], raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise WireError(f"probe header is not msgpack: {e}") from None
    reply_bytes = header.get("reply_bytes") if isinstance(header, dict) else None
    if type(reply_bytes) is not int or not 0 <= reply_bytes <= MAX_PROBE_BYTES:
        raise WireError(f"probe header must be {{'reply_bytes': 0..{MAX_PROBE_BYTES}}}, got {header!r:.100}")
    return reply_bytes


def daemon_reason(error: Exception) -> str:
    """p2pd's last log line without its timestamp, e.g. 'failed to connect to bootstrap peers'."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.removeprefix("Daemon failed to start: ")  # p2pd gives no type or code: trimmed for display only
    return re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text)


def _close_writers_left_open(error: BaseException) -> None:
    """Close the daemon connection hivemind's `stream_open` leaves open when it fails (hivemind 1.1.12).

    `ControlClient.stream_open` opens a connection to the local p2pd, asks for the stream, and raises on a
    refusal (a peer without the handler) or a cancellation without closing that connection; the caller
    never sees it, so it lingers until the garbage collector finds it. It is still a local in the
    failing frames of the traceback, which is where this finds it.
    """
    traceback = error.__traceback__
    while traceback is not None:
        writer = traceback.tb_frame.f_locals.get("writer")
        if isinstance(writer, asyncio.StreamWriter):
            writer.close()
        traceback = traceback.tb_next


async def _probe_once(p2p: P2P, peer_id: PeerID, *, upload_bytes: int, reply_bytes: int) -> tuple[float, float]:
    """One probe: seconds from the request's first byte to the reply's header, and for the reply's body."""
    from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure

    try:
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, PROBE_HANDLER)
    except BaseException as e:
        _close_writers_left_open(e)
        if not isinstance(e, ControlFailure):
            raise
        if "protocols not supported" in str(e):  # p2pd gives no type or code for a handler it lacks
            raise ProbeUnavailableError(f"peer {peer_id} does not serve {PROBE_HANDLER}") from None
        raise ConnectionError(f"cannot open a probe stream to {peer_id}: {daemon_reason(e)}") from None
    try:
        body = encode_probe_request(upload_bytes=upload_bytes, reply_bytes=reply_bytes)
        started = time.perf_counter()
        try:
            await write_frame(writer, kind=MessageKind.PROBE, body=body)
            # Read the header and body ourselves, not with read_frame_from_stream: the header's arrival
            # time is the boundary between the upload and the download measurement.
            header = await reader.readexactly(HEADER_BYTES)
            header_at = time.perf_counter()
            kind, body_bytes = decode_header(
                header, max_body_bytes=MAX_PROBE_BYTES, expected_kinds={MessageKind.PROBE_REPLY}
            )
            reply = await reader.readexactly(body_bytes)
        except asyncio.IncompleteReadError as e:
            raise WireError(f"probe reply ended after {len(e.partial)} bytes") from None
        except (ConnectionResetError, BrokenPipeError):  # a peer that drops the stream may reset it mid-upload
            raise WireError("probe reply ended: the peer reset the stream before replying") from None
        finished = time.perf_counter()
    finally:
        writer.close()
    if kind is MessageKind.ERROR:
        code, reason = decode_error(reply)
        raise PeerRefusedError(f"peer refused the probe: {reason}", code=code, reason=reason)
    if body_bytes != reply_bytes:
        raise WireError(f"asked for {reply_bytes} probe bytes, got {body_bytes}")
    return header_at - started, finished - header_at


async def measure_rates(
    p2p: P2P, peer_id: PeerID, *, upload_bytes: int, download_bytes: int, timeout_s: float
) -> tuple[float, float]:
    """(upload, download) in bytes/s between this node and `peer_id`, measured with its probe handler.

    An empty probe first measures the round trip, which is taken off the upload time (the reply header
    cannot arrive sooner than one round trip after the last uploaded byte left); the download time is
    from the reply's header to its last byte. Each probe is bounded by `timeout_s`. Raises
    ProbeUnavailableError when the peer does not serve the probe, WireError / PeerRefusedError on a bad
    reply, ConnectionError when no stream opens, asyncio.TimeoutError when a probe takes too long.
    """
    for name, value in (("upload_bytes", upload_bytes), ("download_bytes", download_bytes)):
        if not 1 <= value <= MAX_PROBE_BYTES:
            raise ValueError(f"{name} must be between 1 and {MAX_PROBE_BYTES}, got {value}")
    round_trip_s, _ = await asyncio.wait_for(_probe_once(p2p, peer_id, upload_bytes=0, reply_bytes=0), timeout_s)
    upload_s, download_s = await asyncio.wait_for(
        _probe_once(p2p, peer_id, upload_bytes=upload_bytes, reply_bytes=download_bytes), timeout_s
    )
    upload_s = max(upload_s - round_trip_s, _MIN_TRANSFER_S)
    return upload_bytes / upload_s, download_bytes / max(download_s, _MIN_TRANSFER_S)
