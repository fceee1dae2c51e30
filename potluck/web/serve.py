"""Serve a web app with uvicorn as a task inside the host process's running event loop.

The aggregator and the peer own their process: its signals, its logging and its exit code.
So the server here installs no signal handlers, leaves logging configuration alone, binds its
socket itself (a busy port becomes one clear error rather than uvicorn's log line and
sys.exit), and stops when asked. It also bounds its connections, their request heads and their time,
so that a flood of slow or half-sent requests cannot take the descriptors the node's streams need.
"""

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from potluck.errors import PotluckError

logger = logging.getLogger(__name__)

# The page shares the node's descriptors with its libp2p streams; these bounds keep a flood of connections to the
# page from taking them all (1,030 half-sent requests once filled a node's 1,024).
MAX_CONNECTIONS = 256  # open connections at once, well under the common 1,024 soft limit; more are closed at once
# open connections from one remote address, so one address cannot take all of MAX_CONNECTIONS; behind a reverse proxy
# every browser shares the proxy's address, so raise it there (loopback counts like any other address)
MAX_CONNECTIONS_PER_ADDRESS = 32
REQUEST_TIMEOUT_S = 10.0  # to send a whole request (head and body), from connecting or from the last response
KEEP_ALIVE_S = 5  # an idle connection between requests
MAX_HEAD_BYTES = 8 * 1024  # a request head's size; the page's own requests carry a few hundred bytes
# connections waiting to be accepted, which is also how many asyncio accepts at once before any is looked at: with
# uvicorn's 2,048 one burst took every descriptor of a node limited to 1,024 before the caps could close any
ACCEPT_BACKLOG = 64


class WebServerError(PotluckError, RuntimeError):
    """The status page could not be served; the message says why and what to do."""


class _BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with the bounds uvicorn lacks: caps on open connections, in all and per remote
    address, and a deadline for each request.

    uvicorn's `limit_concurrency` only answers 503 once a request's head has arrived, and nothing times out a
    connection that sends half a head (or one byte a second), so each such connection holds a descriptor for as
    long as its sender likes. Here a connection over either cap is closed as soon as it is accepted, and one that
    has not sent a whole request within `request_timeout_s` of connecting (or of its last response) is closed.
    This subclasses uvicorn's internal class: pyproject.toml bounds uvicorn to the versions it was checked
    against, and tests/web/test_serve_limits.py says what broke if a release changes it.
    """

    request_timeout_s = REQUEST_TIMEOUT_S
    max_per_address = MAX_CONNECTIONS_PER_ADDRESS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        """Accept the connection, or close it at once when the page already holds its cap of connections."""
        super().connection_made(transport)
        if (self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency) or (
            self._from_same_address() > self.max_per_address
        ):
            transport.close()
            return
        self._arm_request_deadline()

    def _from_same_address(self) -> int:
        """How many open connections (this one included) come from this connection's remote address."""
        host = _remote_host(self)
        if host is None:  # a unix socket: no address to share
            return 1
        # at most MAX_CONNECTIONS + 1 to look at, and only when a connection is accepted
        return sum(1 for other in self.connections if _remote_host(other) == host)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and its deadline."""
        if self._request_deadline is not None:
            self._request_deadline.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        """The next request on this connection gets a deadline of its own."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_request_deadline()

    def _arm_request_deadline(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
        self._request_deadline = self.loop.call_later(self.request_timeout_s, self._request_overdue)

    def _request_overdue(self) -> None:
        # IDLE: no request head yet; SEND_BODY: a head, but not all of its body
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def _remote_host(protocol: object) -> str | None:
    """The remote address of one of uvicorn's connections (any of its protocol classes), None if it has none."""
    client = getattr(protocol, "client", None)
    return str(client[0]) if isinstance(client, tuple) and client else None


class _HostedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT and SIGTERM to the host process and reports when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace the host's handlers for the server's lifetime and re-raise the
        # signal on exit; the aggregator shuts the page down itself instead.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start serving on `sockets`, then signal `listening`; a failed start raises instead of exiting."""
        try:
            await super().startup(sockets=sockets)
        except SystemExit:  # uvicorn exits the process when the app's startup fails
            raise WebServerError("the status page's app failed to start (see the log above)") from None
        self.listening.set()


class RunningServer:
    """A server running as a task in the current event loop; `await stop()` shuts it down."""

    def __init__(self, *, server: _HostedServer, task: "asyncio.Task[None]", host: str, port: int) -> None:
        """Wrap a started server; use `start_server` to make one."""
        self._server = server
        self._task = task
        self.host = host
        self.port = port  # the bound port, also when 0 asked for an ephemeral one

    @property
    def url(self) -> str:
        """Where a browser on this machine reaches the page, e.g. http://127.0.0.1:8000."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def stop(self, *, timeout_s: float = 5.0) -> None:
        """Close the listening socket, finish open requests for up to `timeout_s`, then cancel the rest."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("the status page did not stop within %.0f s; cancelling it", timeout_s)
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def server_config(
    app: ASGIApp,
    *,
    max_connections: int = MAX_CONNECTIONS,
    max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> uvicorn.Config:
    """The uvicorn configuration of a status page: hosted in the node's loop and bounded so it cannot starve it.

    At most `max_connections` open at once and `max_per_address` from one remote address, each given
    `request_timeout_s` to send a whole request, a head of at most MAX_HEAD_BYTES, and KEEP_ALIVE_S idle between
    requests; at most ACCEPT_BACKLOG accepted at once.
    """
    if max_per_address < 1 or max_connections < 1:
        raise WebServerError(
            f"the status page needs at least one connection (got {max_connections} in all, {max_per_address} "
            "per address)"
        )
    timeout_s, per_address = request_timeout_s, max_per_address

    class Protocol(_BoundedH11Protocol):
        request_timeout_s = timeout_s
        max_per_address = per_address

    return uvicorn.Config(
        app,
        log_config=None,  # the host process configured logging; uvicorn's dictConfig would replace it
        log_level="warning",
        access_log=False,
        http=Protocol,
        ws="none",
        lifespan="off",
        timeout_graceful_shutdown=2,
        limit_concurrency=max_connections,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        backlog=ACCEPT_BACKLOG,
    )


async def start_server(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    startup_timeout_s: float = 10.0,
    max_connections: int = MAX_CONNECTIONS,
    max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> RunningServer:
    """Serve `app` on host:port (0: any free port) in the running loop; return once it accepts connections.

    The connection bounds are server_config's.
    """
    sock = _bind(host, port)
    config = server_config(
        app, max_connections=max_connections, max_per_address=max_per_address, request_timeout_s=request_timeout_s
    )
    server = _HostedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"status page on {host}:{port}")
    listening = asyncio.create_task(server.listening.wait())
    try:
        done, _ = await asyncio.wait({task, listening}, timeout=startup_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _abandon(task, sock)
        raise
    finally:
        listening.cancel()
    if task in done:
        sock.close()
        error = task.exception()
        if isinstance(error, WebServerError):
            raise error
        raise WebServerError(f"the status page on {host}:{port} stopped while starting: {error!r}")
    if not done:
        await _abandon(task, sock)
        raise WebServerError(f"the status page on {host}:{port} did not start within {startup_timeout_s:.0f} s")
    task.add_done_callback(_log_crash)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server=server, task=task, host=host, port=bound_port)


async def _abandon(task: "asyncio.Task[None]", sock: socket.socket) -> None:
    """Cancel a server that never finished starting and release its socket."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    sock.close()


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or WebServerError naming the address and the way out."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise WebServerError(_cannot(host, port, e)) from None
    try:
        if os.name == "posix":  # rebind right after a restart; on Windows the option lets ports be stolen
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise WebServerError(_cannot(host, port, e)) from None
    return sock


def _cannot(host: str, port: int, error: OSError) -> str:
    reason = (error.strerror or str(error)).lower()
    return f"cannot serve the status page on {host}:{port}: {reason}; pass --http-port 0 to disable it or another port"


def _log_crash(task: "asyncio.Task[None]") -> None:
    """Report a server that died on its own, instead of an unretrieved task exception at exit."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("the status page stopped: %s", task.exception())
