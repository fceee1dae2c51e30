"""The status page's bounds: a flood of slow or half-sent HTTP requests cannot take the node's descriptors."""

import asyncio
import contextlib

import h11
import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from potluck.web import RunStatus, WebServerError, create_app, start_server
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
    assert 0 < config.backlog <= 128  # asyncio accepts this many at once, before the caps close any
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


async def _hold_half_request(port: int, *, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from `source` (any 127.x address is this machine) that sends half a request head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(HALF_HEAD)
    await writer.drain()
    return reader, writer


def test_one_address_cannot_hold_more_than_its_share_of_connections() -> None:
    # Prepare: room for 8 connections, 2 of them from any one address; 127.0.0.1 already holds its 2
    async def scenario() -> tuple[bytes, bytes, bytes]:
        running = await start_server(
            _app(), host="127.0.0.1", port=0, max_connections=8, max_per_address=2, request_timeout_s=30
        )
        held = []
        try:
            held += [await _hold_half_request(running.port, source="127.0.0.1") for _ in range(2)]
            # Execute: a third from the same address, then one from another (loopback counts like any address)
            third = await _exchange(running.port, HEALTH, read_all=True)
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port, local_addr=("127.0.0.2", 0))
            held.append((reader, writer))
            writer.write(HEALTH)
            other = await asyncio.wait_for(reader.read(65536), 10)
            # once one of the first two goes, the address has room again
            first_writer = held.pop(0)[1]
            first_writer.close()
            await first_writer.wait_closed()
            again = b""
            for _ in range(100):  # the server learns of the close when its loop reads it: a moment, not a deadline
                again = await _exchange(running.port, HEALTH)
                if again:
                    break
                await asyncio.sleep(0.05)
        finally:
            for _, writer in held:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await running.stop()
        return third, other, again

    third, other, again = asyncio.run(scenario())
    # Assert
    assert third == b""
    assert other.startswith(b"HTTP/1.1 200")
    assert again.startswith(b"HTTP/1.1 200")


def test_the_per_address_cap_must_leave_room_for_a_connection() -> None:
    with pytest.raises(WebServerError, match="at least one connection"):
        server_config(_app(), max_per_address=0)


def test_uvicorns_internal_connection_class_still_has_the_shape_the_bounds_rely_on() -> None:
    """The page's bounds subclass uvicorn's internal H11Protocol; a uvicorn release that changes it must fail here,
    saying what changed, rather than leave the page unbounded."""
    # Prepare
    where = f"uvicorn {uvicorn.__version__} changed its internal H11Protocol, which potluck.web.serve subclasses"
    advice = "adapt _BoundedH11Protocol to it, or keep uvicorn within the range pyproject.toml allows"
    config = server_config(_app(), max_connections=4, max_per_address=2)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        state = ServerState()
        # Execute
        protocol = config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
        transport = _FakeTransport(peer=("127.0.0.9", 5000))
        protocol.connection_made(transport)
        # Assert
        assert isinstance(protocol, H11Protocol), f"{where}: server_config's http class is no H11Protocol; {advice}"
        for method in ("connection_made", "connection_lost", "on_response_complete", "data_received"):
            assert callable(getattr(H11Protocol, method, None)), f"{where}: it has no {method}(); {advice}"
        assert callable(getattr(uvicorn.Server, "capture_signals", None)), (
            f"uvicorn {uvicorn.__version__}'s Server has no capture_signals(), which potluck.web.serve overrides to "
            f"keep the node's signal handlers; {advice}"
        )
        assert protocol.connections is state.connections, f"{where}: `connections` is not the server's set; {advice}"
        assert protocol in state.connections, f"{where}: connection_made no longer records the connection; {advice}"
        assert protocol.client == ("127.0.0.9", 5000), f"{where}: `client` is not the remote address; {advice}"
        assert protocol.limit_concurrency == 4, f"{where}: `limit_concurrency` is not the config's; {advice}"
        assert isinstance(protocol.conn, h11.Connection), f"{where}: `conn` is no h11 connection; {advice}"
        assert protocol.loop is loop and protocol.transport is transport, f"{where}: `loop`/`transport`; {advice}"
        assert not transport.closed, f"{where}: a connection under the caps was closed; {advice}"
        protocol.connection_lost(None)
        assert protocol not in state.connections, f"{where}: connection_lost no longer forgets it; {advice}"
    finally:
        loop.close()


class _FakeTransport(asyncio.Transport):
    """Just enough of a transport for a protocol to be made and lost: a remote address and close()."""

    def __init__(self, *, peer: tuple[str, int]) -> None:
        super().__init__()
        self._extra = {"peername": peer, "sockname": ("127.0.0.1", 8000)}
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True
