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

from potluck.cli.log_limit import limit_repeats
from potluck.protocol.stopping import quiet_about_cancellation

logger = logging.getLogger(__name__)


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run `main`; SIGTERM cancels it like Ctrl-C does, so its cleanup runs either way."""

    async def guarded() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        loop.set_exception_handler(quiet_about_cancellation)
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
    """Ready this process to be a node: as many open files as the system allows (raise_descriptor_limit), torch's
    CPU threads (None: torch's own choice), and with `return_memory` a step's large freed tensors handed back to
    the system (potluck.training.host_memory)."""
    from hivemind.utils.logging import get_logger as hivemind_logger

    from potluck.training.device import set_cpu_threads  # torch: not for --help
    from potluck.training.host_memory import return_freed_memory

    raise_descriptor_limit()
    limit_repeats(hivemind_logger("hivemind"))  # hivemind logs through a handler of its own, not the root's
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


def raised_descriptor_limit(soft: int, hard: int, *, unlimited: int) -> int:
    """The soft limit on open files to ask for, given the current `soft` and `hard` limits: the hard one.

    An `unlimited` hard limit (macOS) is not a value setrlimit accepts for files, so the soft one then rises to
    a bound that still covers any node; a soft limit already above that is kept.
    """
    if hard == unlimited:
        return soft if soft == unlimited else max(soft, _UNLIMITED_HARD_SOFT)
    return max(soft, hard)


_UNLIMITED_HARD_SOFT = 10240  # macOS's OPEN_MAX, the most a process may ask for there


def raise_descriptor_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit; the new soft limit, or None if it stays.

    Every HTTP connection and every libp2p stream handed over by p2pd is a descriptor, and a common default of
    1,024 is filled by a thousand half-open connections, after which the node's own streams fail with "Too many
    open files". Raising the soft limit needs no privilege; if the system refuses, the node runs on (said once).
    """
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = raised_descriptor_limit(soft, hard, unlimited=resource.RLIM_INFINITY)
    if wanted == soft:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as e:
        logger.warning(
            "could not raise the open-file limit from %d to %d (%s); the node runs with %d", soft, wanted, e, soft
        )
        return None
    logger.info("open-file limit raised from %d to %d", soft, wanted)
    return wanted
