"""Serve a web app with uvicorn as a task inside the host process's running event loop.

The aggregator and the peer own their process: its signals, its logging and its exit code.
So the server here installs no signal handlers, leaves logging configuration alone, binds its
socket itself (a busy port becomes one clear error rather than uvicorn's log line and
sys.exit), and stops when asked.
"""

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from potluck.errors import PotluckError

logger = logging.getLogger(__name__)


class WebServerError(PotluckError, RuntimeError):
    """The status page could not be served; the message says why and what to do."""


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


async def start_server(app: ASGIApp, *, host: str, port: int, startup_timeout_s: float = 10.0) -> RunningServer:
    """Serve `app` on host:port (0: any free port) in the running loop; return once it accepts connections."""
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        log_config=None,  # the host process configured logging; uvicorn's dictConfig would replace it
        log_level="warning",
        access_log=False,
        http="h11",
        ws="none",
        lifespan="off",
        timeout_graceful_shutdown=2,
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
