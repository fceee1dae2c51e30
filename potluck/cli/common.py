"""What every command module shares: the terminal's two consoles, the usage error, the default paths.

The bottom of the `potluck.cli` package (it imports only potluck.errors), so any command module may import it.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from potluck.errors import PotluckError

stderr = Console(stderr=True)
stdout = Console()

DEFAULT_IDENTITY = Path("~/.potluck/identity.key")
DEFAULT_STATE_DIR = Path("~/.potluck/aggregator")
DEFAULT_RECEIPTS = Path("~/.potluck/receipts")
DEFAULT_HTTP_PORT = 8000  # a node's status page, JSON API and /metrics


class UsageError(PotluckError):
    """A flag's value cannot be used; the message says which and why."""
