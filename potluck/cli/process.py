"""What every long-running node command does around its node: threads, identity, and stopping cleanly.

A node runs one asyncio loop until its work is done, Ctrl-C or SIGTERM; on any of these the DHT node
and its libp2p daemon are shut down before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import typer

logger = logging.getLogger(__name__)


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run `main`; SIGTERM cancels it like Ctrl-C does, so its cleanup runs either way."""

    async def guarded() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        await main

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    signal.signal(signal.SIGTERM, interrupt)  # until the loop takes over: a SIGTERM during start-up still cleans up
    try:
        asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("interrupted: the node and its p2pd have stopped", file=sys.stderr, flush=True)
        raise typer.Exit(130) from None
    finally:
        # The node has stopped; what is left is the interpreter's own teardown, whose garbage collections
        # walk every object torch and hivemind made (about a CPU-second per process, five seconds of wall
        # time when a local swarm's nine processes exit together). Frozen objects are not walked.
        gc.freeze()


def prepare_node_process(threads: int | None, *, return_memory: bool = False) -> None:
    """Ready this process to be a node: torch's CPU threads (None: torch's own choice), and with `return_memory`
    a step's large freed tensors handed back to the system (potluck.training.host_memory)."""
    from potluck.training.device import set_cpu_threads  # torch: not for --help
    from potluck.training.host_memory import return_freed_memory

    if return_memory and not return_freed_memory():
        logger.warning("--return-memory has no effect here: it needs Linux's glibc")
    set_cpu_threads(threads)


def node_identity(path: Path) -> Any:
    """The node's Ed25519 identity at `path`, created (and said so) on its first run."""
    from potluck.protocol.identity import load_or_create_identity

    node_identity, created = load_or_create_identity(path.expanduser())
    if created:
        logger.warning("created identity %s at %s", node_identity.fingerprint, path)
    return node_identity

