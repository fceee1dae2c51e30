"""potluck: volunteers train one model together over ordinary internet links.

Peers train locally (DiLoCo: inner AdamW, outer Nesterov), publish compressed signed
pseudo-gradients, and aggregators combine them. See DESIGN.md for the architecture.

The Python API is imported on first use (``import potluck`` stays light for the command line):
``potluck.Task`` to bring your own model and data, ``potluck.Aggregator`` and ``potluck.Peer`` to run
the nodes from Python, ``potluck.Optimizer`` to join a run from your own training loop, ``potluck.RunConfig``
to describe a run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from potluck.errors import PotluckError
    from potluck.nodes import Aggregator, Peer
    from potluck.peer.own_loop import Optimizer
    from potluck.protocol.config import RunConfig
    from potluck.tasks import Task, TaskError

__all__ = ["Aggregator", "Optimizer", "Peer", "PotluckError", "RunConfig", "Task", "TaskError", "__version__"]

_LAZY = {
    "Aggregator": "potluck.nodes",
    "Optimizer": "potluck.peer.own_loop",
    "Peer": "potluck.nodes",
    "PotluckError": "potluck.errors",
    "RunConfig": "potluck.protocol.config",
    "Task": "potluck.tasks",
    "TaskError": "potluck.tasks",
}


def __getattr__(name: str) -> Any:
    """The public API's names, imported when first asked for (torch is not loaded by `import potluck`)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'potluck' has no attribute {name!r}")
