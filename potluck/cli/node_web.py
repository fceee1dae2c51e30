"""The node processes' status pages: a node's events feed its page, served in the node's own event loop.

Glue between a running node (aggregator or peer) and `potluck.web`, which knows neither: the page
reads the events the node already prints, and the aggregator's admin endpoints call its methods.
"""

import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from potluck.aggregator_server.server import AggregatorServer
from potluck.events import Event, StatusPage
from potluck.protocol.identity import fingerprint, public_key_from_hex
from potluck.web import PeerStatus, RunStatus, WebServerError, create_app, create_peer_app, start_server
from potluck.web.serve import MAX_CONNECTIONS_PER_ADDRESS

logger = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True, slots=True)
class PageOptions:
    """Where a node serves its status page; port 0: no page."""

    host: str = "127.0.0.1"
    port: int = 0
    required: bool = True  # False: the port was the default, so a busy one is a warning, not an error
    admin_token: str | None = None
    max_per_address: int | None = None  # open connections one remote address may hold; None: the page's default


class AggregatorAdmin:
    """The status page's admin actions, carried out by the running aggregator."""

    def __init__(self, server: AggregatorServer) -> None:
        self.server = server

    def _key(self, peer: str) -> bytes:
        """A public key from 64 hex characters, or the fingerprint of a key this run has seen."""
        if peer.startswith("pl-"):
            for key in self.server.known_keys():
                if fingerprint(key) == peer:
                    return key
            raise LookupError(f"{peer} has not been seen in this run; give its 64-hex public key instead")
        return public_key_from_hex(peer)  # ValueError: a 400 with its message

    async def ban(self, peer: str, reason: str) -> dict[str, Any]:
        """Ban a peer from the next upload on."""
        key = self._key(peer)
        await self.server.ban(key, reason=reason)
        return {"banned": fingerprint(key), "reason": reason}

    async def unban(self, peer: str) -> dict[str, Any]:
        """Lift a peer's ban; LookupError if it was not banned."""
        key = self._key(peer)
        if not await self.server.unban(key):
            raise LookupError(f"{fingerprint(key)} is not banned")
        return {"unbanned": fingerprint(key)}

    async def close_round(self) -> dict[str, Any]:
        """Close the open round as soon as the aggregator's loop wakes."""
        return {"closing_round": await self.server.close_round_now()}


def aggregator_page(*, on_event: Callable[[Event], None]) -> tuple[RunStatus, Callable[[Event], None]]:
    """The aggregator's status object and an event callback that feeds it and then `on_event`."""
    status = RunStatus()

    def emit(event: Event) -> None:
        status.handle(event)
        on_event(event)

    return status, emit


def peer_page(*, on_event: Callable[[Event], None]) -> tuple[PeerStatus, Callable[[Event], None]]:
    """A peer's status object and an event callback that feeds it and then `on_event`."""
    status = PeerStatus()

    def emit(event: Event) -> None:
        status.handle(event)
        on_event(event)

    return status, emit


async def serve_with_page(
    main: Coroutine[Any, Any, None], app: Any, options: PageOptions, *, on_event: Callable[[Event], None]
) -> None:
    """Run `main` with `app` served beside it (unless port 0), stopping the page when `main` ends.

    A busy port is a WebServerError when the port was asked for, a warning when it was the default.
    """
    running = None
    if options.port:
        try:
            per_address = options.max_per_address or MAX_CONNECTIONS_PER_ADDRESS
            running = await start_server(app, host=options.host, port=options.port, max_per_address=per_address)
        except WebServerError as e:
            if options.required:
                main.close()
                raise
            logger.warning("%s; going on without a status page", e)
    if running is not None:
        on_event(StatusPage(url=running.url))
    try:
        await main
    finally:
        if running is not None:
            with contextlib.suppress(Exception):
                await running.stop()


def aggregator_app(status: RunStatus, server: AggregatorServer, options: PageOptions) -> Any:
    """The aggregator's FastAPI app, with admin actions only when a token is configured."""
    admin = AggregatorAdmin(server) if options.admin_token else None
    return create_app(status, admin=admin, admin_token=options.admin_token)


def peer_app(status: PeerStatus) -> Any:
    """A peer's FastAPI app: its own view of its work."""
    return create_peer_app(status)
