"""Serving state chunks (potluck.chunk): the one stream handler that aggregators and peers both run.

A peer serves at most MAX_CHUNK_STREAMS chunks at once (an aggregator AGGREGATOR_CHUNK_STREAMS), at most
a few of them (CHUNK_STREAMS_PER_PEER) to any one remote peer, and answers "busy" beyond that, so joiners
spread over donors instead of queueing on one; a joiner that hears "busy" gives the chunk to another donor
and asks this one again a little later. The request is read before any refusal, so the asker hears why.

Every step has a deadline (wire.Deadlines): the request must arrive within seconds, and the reply, whose
size the state's manifest sets (not the asker), must be taken at a minimum rate, or the stream is
dropped and its slot freed: a requester that never reads its replies holds slots for seconds, not minutes.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from potluck.errors import PotluckError
from potluck.protocol.limits import Busy, StreamLimits, peer_of
from potluck.protocol.messages import BUSY_PREFIX
from potluck.protocol.state_chunks import ChunkError, ChunkRequest, chunk_of
from potluck.protocol.wire import (
    DEFAULT_DEADLINES,
    Deadlines,
    MessageKind,
    RefusalCode,
    VersionMismatchError,
    WireError,
    abort,
    error_body,
    read_frame_from_stream,
    write_frame,
)

logger = logging.getLogger(__name__)

MAX_CHUNK_STREAMS = 4  # chunks one peer sends at once: joiners get a share of its link, not all of it
AGGREGATOR_CHUNK_STREAMS = 32  # an aggregator's link is the fat one, and it is every joiner's first donor
# a joiner asks one holder for at most 2 chunks at once (sync.py), more in a download's endgame
CHUNK_STREAMS_PER_PEER = 2
AGGREGATOR_CHUNK_STREAMS_PER_PEER = 4
WAITING_REQUESTS_PER_SLOT = 4  # streams whose request is still being read, per slot: closed unanswered beyond that
_MAX_REQUEST_BYTES = 256

Handler = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


MAX_PACING_WAIT_S = 20.0  # a chunk that would wait longer for its turn under the rate cap is answered "busy"


class ChunkUnavailable(PotluckError):
    """This node does not hold the state a chunk was asked of, or is busy (one line and a code, sent to the asker)."""

    def __init__(self, message: str, *, code: RefusalCode = RefusalCode.NOT_HELD) -> None:
        super().__init__(message)
        self.code = code


class Pacer:
    """Spaces chunk sends so they average at most `bytes_per_s` (an operator's cap on what joiners may take)."""

    def __init__(self, bytes_per_s: float) -> None:
        if not bytes_per_s > 0:
            raise ValueError(f"a rate cap must be positive, got {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self._free_at = 0.0  # monotonic time the cap allows the next send

    async def take(self, n: int) -> None:
        """Wait for the turn of a send of `n` bytes; ChunkUnavailable ("busy") when that is over MAX_PACING_WAIT_S."""
        now = time.monotonic()
        start = max(now, self._free_at)
        if start - now > MAX_PACING_WAIT_S:
            raise ChunkUnavailable(
                f"{BUSY_PREFIX}this node caps what it sends joiners; ask another holder", code=RefusalCode.BUSY
            )
        self._free_at = start + n / self.bytes_per_s
        await asyncio.sleep(start - now)  # pacing: the wait is the rate cap itself


def _code(e: Exception) -> RefusalCode:
    """The code of the ERROR frame that answers a chunk request refused with `e`."""
    if isinstance(e, ChunkUnavailable):
        return e.code
    if isinstance(e, Busy):
        return RefusalCode.BUSY
    if isinstance(e, VersionMismatchError):
        return RefusalCode.VERSION_MISMATCH
    return RefusalCode.BAD_REQUEST  # a malformed frame or chunk request


def chunk_handler(
    find: Callable[[ChunkRequest], Awaitable[bytes]],
    *,
    on_served: Callable[[int], None] = lambda n: None,
    max_streams: int = MAX_CHUNK_STREAMS,
    per_peer: int = CHUNK_STREAMS_PER_PEER,
    pacer: Pacer | None = None,
    deadlines: Deadlines = DEFAULT_DEADLINES,
) -> Handler:
    """A potluck.chunk stream handler: `find` returns the whole payload a request names, or ChunkUnavailable.

    At most `max_streams` chunks go out at once, `per_peer` of them to one remote peer; every read and
    write runs under `deadlines`. With `pacer`, chunks leave no faster than its rate on average.
    """
    streams = StreamLimits("chunk streams", total=max_streams, per_owner=per_peer)
    # streams whose request has not arrived yet: bounded too, so a flood of silent streams costs descriptors
    # only up to this, and is closed unanswered beyond it
    waiting = StreamLimits(
        "chunk requests", total=WAITING_REQUESTS_PER_SLOT * max_streams, per_owner=WAITING_REQUESTS_PER_SLOT * per_peer
    )

    async def handle(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(info)
        try:
            try:
                with waiting.slot(peer):
                    _, body = await read_frame_from_stream(
                        reader,
                        max_body_bytes=_MAX_REQUEST_BYTES,
                        expected_kinds={MessageKind.CHUNK_REQUEST},
                        deadlines=deadlines,
                    )
            except Busy as e:  # a flood of streams, not a request: nothing was read, nothing is answered
                logger.debug("chunk stream from %s closed unread: %s", getattr(info, "peer_id", "?"), e)
                abort(writer)
                return
            with streams.slot(peer):
                request = ChunkRequest.from_bytes(body)
                chunk = chunk_of(await find(request), request)
                if pacer is not None:
                    await pacer.take(len(chunk))
                await write_frame(writer, kind=MessageKind.CHUNK, body=chunk, deadlines=deadlines)
                on_served(len(chunk))
        except (Busy, ChunkUnavailable, ChunkError, WireError) as e:
            await _refuse(info, writer, e, deadlines)
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("chunk request from %s dropped: %s", getattr(info, "peer_id", "?"), e or type(e).__name__)
            abort(writer)
        except Exception:
            logger.exception("chunk handler failed")
        finally:
            writer.close()

    return handle


async def _refuse(info: object, writer: asyncio.StreamWriter, e: Exception, deadlines: Deadlines) -> None:
    """Answer a refused chunk request with its ERROR frame (bounded in time like any reply)."""
    logger.debug("chunk request from %s refused: %s", getattr(info, "peer_id", "?"), e)
    with contextlib.suppress(Exception):
        await write_frame(writer, kind=MessageKind.ERROR, body=error_body(str(e), code=_code(e)), deadlines=deadlines)
