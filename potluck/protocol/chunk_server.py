"""Serving state chunks (potluck.chunk): the one stream handler that aggregators and peers both run.

A peer serves at most MAX_CHUNK_STREAMS chunks at once (an aggregator AGGREGATOR_CHUNK_STREAMS) and
answers "busy" beyond that, so joiners spread over donors instead of queueing on one; a joiner that
hears "busy" gives the chunk to another donor and asks this one again a little later.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from potluck.protocol.messages import BUSY_PREFIX
from potluck.protocol.state_chunks import ChunkError, ChunkRequest, chunk_of
from potluck.protocol.wire import MessageKind, WireError, error_body, read_frame_from_stream, write_frame

logger = logging.getLogger(__name__)

MAX_CHUNK_STREAMS = 4  # chunks one peer sends at once: joiners get a share of its link, not all of it
AGGREGATOR_CHUNK_STREAMS = 32  # an aggregator's link is the fat one, and it is every joiner's first donor
REQUEST_TIMEOUT_S = 30.0
_MAX_REQUEST_BYTES = 256

Handler = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ChunkUnavailable(Exception):
    """This node does not hold the state a chunk was asked of (one line, sent back to the asker)."""


def chunk_handler(
    find: Callable[[ChunkRequest], Awaitable[bytes]],
    *,
    on_served: Callable[[int], None] = lambda n: None,
    max_streams: int = MAX_CHUNK_STREAMS,
) -> Handler:
    """A potluck.chunk stream handler: `find` returns the whole payload a request names, or ChunkUnavailable."""
    streams = asyncio.Semaphore(max_streams)

    async def handle(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if streams.locked():
                raise ChunkUnavailable(f"{BUSY_PREFIX}serving {max_streams} chunks already; ask another holder")
            async with streams:
                _, body = await asyncio.wait_for(
                    read_frame_from_stream(
                        reader, max_body_bytes=_MAX_REQUEST_BYTES, expected_kinds={MessageKind.CHUNK_REQUEST}
                    ),
                    REQUEST_TIMEOUT_S,
                )
                request = ChunkRequest.from_bytes(body)
                chunk = chunk_of(await find(request), request)
                await write_frame(writer, kind=MessageKind.CHUNK, body=chunk)
                on_served(len(chunk))
        except (ChunkUnavailable, ChunkError, WireError) as e:
            logger.debug("chunk request from %s refused: %s", getattr(info, "peer_id", "?"), e)
            with contextlib.suppress(Exception):
                await write_frame(writer, kind=MessageKind.ERROR, body=error_body(str(e)))
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("chunk request from %s dropped: %s", getattr(info, "peer_id", "?"), e or type(e).__name__)
        except Exception:
            logger.exception("chunk handler failed")
        finally:
            writer.close()

    return handle
