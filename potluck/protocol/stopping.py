"""What a node's event loop reports while it stops: not the futures its cancelled tasks leave unread."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


def quiet_about_cancellation(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A loop exception handler: a future that ended cancelled and was never awaited is dropped, anything else is
    reported as asyncio would.

    On Ctrl-C or stop() the node's tasks are cancelled mid-await; hivemind's DHT stores gather sub-tasks whose
    gathered future then ends cancelled with no one left to read it, and asyncio would print that as an error
    with a traceback on the way out. Nothing was lost: the node was stopping.
    """
    if isinstance(context.get("exception"), asyncio.CancelledError):
        logger.debug("dropped while stopping: %s", context.get("message"))
        return
    loop.default_exception_handler(context)
