"""The status page's bounds: a flood of slow or half-sent HTTP requests cannot take the node's descriptors."""

import asyncio
import contextlib

from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from potluck.web import RunStatus, create_app, start_server
from potluck.web.serve import MAX_HEAD_BYTES, server_config
from tests.web.events import ready

HEALTH = b"GET /api/health HTTP/1.1\r\nHost: page\r\n\r\n"
HALF_HEAD = b"GET /api/health HTTP/1.1\r\nHost: pa"
COMMON_SOFT_LIMIT = 1024  # the open-file soft limit many systems start a process with


def _app() -> FastAPI:
    status = RunStatus()
    status.handle(ready())
    return create_app(status)


async def _exchange(port: int, request: bytes, *, read_all: bool = False) -> bytes:
    """Send `request` on a fresh connection; what the server sends back (all of it, or its first chunk)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read() if read_all else reader.read(65536), 10)
    except ConnectionError:  # closed before or while the request went out: nothing came back
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def test_the_page_config_bounds_connections_request_heads_and_idle_time() -> None:
    # Execute
    config = server_config(_app())
    # Assert
    assert config.limit_concurrency is not None and 0 < config.limit_concurrency <= COMMON_SOFT_LIMIT // 2
    assert config.h11_max_incomplete_event_size is not None and config.h11_max_incomplete_event_size <= 16 * 1024
    assert 0 < config.timeout_keep_alive <= 30
    assert isinstance(config.http, type) and issubclass(config.http, H11Protocol)


def test_connections_over_the_cap_are_closed_at_once() -> None:
    # Prepare: the cap is 2; one connection stays open (keep-alive) after its answer, one holds half a request
    async def scenario() -> tuple[bytes, bytes]:
        running = await start_server(_app(), host="127.0.0.1", port=0, max_connections=2, request_timeout_s=30)
        held = []
        try:
            held.append(await asyncio.open_connection("127.0.0.1", running.port))
            held[0][1].write(HEALTH)
            answered = await asyncio.wait_for(held[0][0].read(65536), 10)
            held.append(await asyncio.open_connection("127.0.0.1", running.port))
            held[1][1].write(HALF_HEAD)
            # Execute: a third comes in while both are open (the server accepts in the order clients connect)
            over_cap = await _exchange(running.port, HEALTH, read_all=True)
        finally:
            for _, writer in held:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await running.stop()
        return answered, over_cap

    answered, over_cap = asyncio.run(scenario())
    # Assert
    assert answered.startswith(b"HTTP/1.1 200")
    assert over_cap == b""


def test_a_half_sent_request_is_closed_at_its_deadline() -> None:
    # Prepare
    async def scenario() -> bytes:
        running = await start_server(_app(), host="127.0.0.1", port=0, request_timeout_s=0.2)
        try:
            # Execute: without the deadline, the server would wait for the rest of the head forever
            return await _exchange(running.port, HALF_HEAD, read_all=True)
        finally:
            await running.stop()

    # Assert
    assert asyncio.run(scenario()) == b""


def test_a_request_head_over_the_bound_is_refused() -> None:
    # Prepare
    oversized = b"GET /api/health HTTP/1.1\r\nHost: page\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES

    async def scenario() -> bytes:
        running = await start_server(_app(), host="127.0.0.1", port=0)
        try:
            # Execute
            return await _exchange(running.port, oversized, read_all=True)
        finally:
            await running.stop()

    # Assert
    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 400")
