"""The aggregator's side of the bandwidth probe: read a PROBE frame, answer with as many bytes as it asks for.

The request's layout and the client that measures a link with it are in `potluck.protocol.probe`.
Both directions are bounded by MAX_PROBE_BYTES, so a probe costs the server at most 8 MiB in and
8 MiB out; a malformed or oversize request gets an ERROR frame with one line of text.
"""

import asyncio
import logging
from typing import Any

from potluck.protocol.probe import MAX_PROBE_BYTES, PROBE_HANDLER, decode_probe_request, encode_probe_request
from potluck.protocol.wire import (
    Deadlines,
    MessageKind,
    RefusalCode,
    WireError,
    error_body,
    read_frame_from_stream,
    write_frame,
)

__all__ = [
    "MAX_PROBE_BYTES",
    "PROBE_HANDLER",
    "answer_probe",
    "decode_probe_request",
    "encode_probe_request",
    "handle_probe",
]

logger = logging.getLogger(__name__)

# A probe stream must finish each direction within this many seconds: 8 MiB at about 1 Mbit/s, so a slow
# volunteer still gets an answer while a silent peer cannot hold the handler open forever.
PROBE_STEP_TIMEOUT_S = 90.0


async def handle_probe(stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one probe: read the PROBE frame, reply with PROBE_REPLY (or ERROR), always close the stream.

    Register with `await p2p.add_binary_stream_handler(PROBE_HANDLER, handle_probe)`. A peer that goes
    away mid-probe is logged at debug level, never raised: it is the peer's problem, not the server's.
    """
    peer = getattr(stream_info, "peer_id", "?")
    try:
        try:
            _, body = await asyncio.wait_for(
                read_frame_from_stream(reader, max_body_bytes=MAX_PROBE_BYTES, expected_kinds={MessageKind.PROBE}),
                PROBE_STEP_TIMEOUT_S,
            )
            decode_probe_request(body)
        except (WireError, asyncio.TimeoutError) as e:
            reason = str(e) or f"no probe request within {PROBE_STEP_TIMEOUT_S:.0f} s"
            logger.info("refused a probe from %s: %s", peer, reason)
            await asyncio.wait_for(
                write_frame(writer, kind=MessageKind.ERROR, body=error_body(reason, code=RefusalCode.BAD_REQUEST)),
                PROBE_STEP_TIMEOUT_S,
            )
            return
        await answer_probe(peer, body, writer)
    except (OSError, asyncio.TimeoutError) as e:
        logger.debug("probe from %s ended early: %r", peer, e)
    finally:
        writer.close()


async def answer_probe(
    peer: object, body: bytes, writer: asyncio.StreamWriter, *, deadlines: Deadlines | None = None
) -> None:
    """Answer a probe request already read (`body`) with the PROBE_REPLY it asks for; WireError if malformed.

    With `deadlines` the reply is bounded by them (a reader that stops reading is dropped), otherwise by
    PROBE_STEP_TIMEOUT_S.
    """
    reply_bytes = decode_probe_request(body)
    del body  # up to 8 MiB of filler: do not hold it while the reply goes out
    reply = write_frame(writer, kind=MessageKind.PROBE_REPLY, body=bytes(reply_bytes), deadlines=deadlines)
    await (reply if deadlines is not None else asyncio.wait_for(reply, PROBE_STEP_TIMEOUT_S))
    logger.debug("served a probe from %s: %d bytes back", peer, reply_bytes)
