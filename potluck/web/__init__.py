"""The status pages: the aggregator's dashboard, JSON API and /metrics, and a peer's own page.

A pure consumer of the nodes' events: the CLI calls `handle(event)` for every event and serves
the app with `start_server` in its own event loop. Imports nothing of potluck but `protocol`.
"""

from potluck.web.admin import AdminActions
from potluck.web.app import create_app
from potluck.web.peer_app import create_peer_app
from potluck.web.peer_status import PeerStatus
from potluck.web.serve import RunningServer, WebServerError, start_server
from potluck.web.status import RunStatus

__all__ = [
    "AdminActions",
    "PeerStatus",
    "RunStatus",
    "RunningServer",
    "WebServerError",
    "create_app",
    "create_peer_app",
    "start_server",
]
