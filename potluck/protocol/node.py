"""Starting a potluck node on hivemind: a DHT node with its libp2p daemon, in this process's event loop.

Peers and aggregators both run hivemind's `DHTNode` inside their own asyncio loop rather than
`hivemind.DHT`, which forks a process of its own: one process per node is easier on a 2-core
machine running a whole local swarm, and shutting the loop down shuts the daemon down with it.
The node's `P2P` (the same daemon) carries the bulk streams (see wire.py and messages.py).

Join addresses are parsed here so that every command gives the same one-line error for a bad one.
"""

import asyncio
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    # `import hivemind` runs torch.jit.script, which recent torch deprecates with a warning of its own.
    warnings.simplefilter("ignore", DeprecationWarning)
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

from potluck.errors import PotluckError
from potluck.protocol.dht_schema import Ed25519RecordValidator
from potluck.protocol.identity import Identity

logger = logging.getLogger(__name__)


class _DropReapedDaemonWarning(logging.Filter):
    """Hide two asyncio messages about a p2pd that is already gone; what the user needs is said elsewhere.

    First, the "Unknown child process pid N" warning for a p2pd that died during start-up.

    When p2pd exits before it is ready (an unreachable bootstrap peer), hivemind has already reaped it
    by the time we shut the half-made node down, and asyncio's child watcher logs a warning about a
    pid it can no longer find: noise on top of the one-line JoinError the user gets.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)  # asyncio's log records carry no type or code: only their text tells them apart
        if message.startswith("Unknown child process pid"):
            return False
        # On Ctrl-C the terminal stops p2pd too, and hivemind's reader of its control connection ends with
        # a reset nobody awaits; asyncio would print that traceback after our clean shutdown.
        error = record.exc_info[1] if record.exc_info else None
        return not (
            message.startswith("Task exception was never retrieved")
            and "_read_from_persistent_conn" in message
            and isinstance(error, ConnectionError | asyncio.IncompleteReadError)
        )


logging.getLogger("asyncio").addFilter(_DropReapedDaemonWarning())

JOIN_FORMAT = "/ip4/<ip>/tcp/<port>/p2p/<peer id>, as printed by aggregator-server"


class JoinError(PotluckError):
    """A join address is malformed or does not answer (one line, with the fix)."""


def parse_join_address(text: str) -> Multiaddr:
    """A bootstrap multiaddr that names its peer (`/p2p/<id>`); JoinError with the expected form otherwise."""
    text = text.strip()
    try:
        maddr = Multiaddr(text)
    except Exception as e:  # multiaddr raises several types (ValueError, StringParseError, BinaryParseError, ...)
        first = str(e).splitlines()[0] if str(e) else ""
        # multiaddr gives no type or code for why: its text is trimmed for the user's line, never branched on
        reason = first.removeprefix(f"Invalid MultiAddr {text!r}").lstrip(": ") or "cannot parse"
        raise JoinError(f"{text!r} is not a valid multiaddr: {reason}; expected {JOIN_FORMAT}") from None
    protocols = [p.name for p in maddr.protocols()]
    if "p2p" not in protocols:
        raise JoinError(f"{text!r} has no /p2p/<peer id> part; expected {JOIN_FORMAT}")
    if not {"ip4", "ip6", "dns", "dns4", "dns6"} & set(protocols) or "tcp" not in protocols and "udp" not in protocols:
        raise JoinError(f"{text!r} names no host and port; expected {JOIN_FORMAT}")
    return maddr


def peer_id_of(maddr: Multiaddr) -> PeerID:
    """The libp2p peer id in a multiaddr's /p2p/ part."""
    return PeerID.from_base58(maddr.value_for_protocol("p2p"))


@dataclass(frozen=True, slots=True)
class Node:
    """A running potluck node: its DHT node and the P2P (one p2pd) both run on."""

    dht: DHTNode
    p2p: P2P

    async def shutdown(self, *, timeout_s: float = 3.0) -> None:
        """Stop the DHT node, then the daemon; safe to call on any exit path, bounded in time.

        The bound matters on Ctrl-C: the terminal sends SIGINT to p2pd too, and hivemind's DHT shutdown
        can wait forever on a daemon that is already gone.
        """
        child = getattr(self.p2p, "_child", None)  # hivemind's handle on its p2pd process
        try:
            if child is None or child.returncode is None:  # a dead daemon cannot take the DHT's goodbyes
                await asyncio.wait_for(self.dht.shutdown(), timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            logger.debug("DHT node did not stop within %.0f s; stopping its daemon anyway", timeout_s)
        finally:
            try:
                await asyncio.wait_for(self.p2p.shutdown(), timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                logger.warning("p2pd did not exit within %.0f s of being told to", timeout_s)


async def dial(p2p: P2P, peer_id: PeerID, maddrs: Sequence[Multiaddr], *, timeout_s: float = 15.0) -> None:
    """Open a connection to `peer_id` at `maddrs`, best effort: the daemon may already hold one, or the node is
    restarting; the request that follows says whether it can be reached."""
    try:
        await asyncio.wait_for(p2p._client.connect(peer_id, list(maddrs)), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - p2pd raises its own error types; the next call reports
        logger.debug("connect to %s: %s", peer_id, e)


async def create_p2p(*, max_connections: int | None = None, **p2p_kwargs: Any) -> P2P:
    """`P2P.create`, but a failed or cancelled start leaves no p2pd behind, with a connection limit of our choosing.

    hivemind 1.1.12's `P2P.create` raises without shutting down the half-made node when p2pd exits
    during start-up (e.g. "failed to connect to bootstrap peers"), so every instance it makes is
    recorded and shut down on failure; the start is shielded from cancellation so that what it
    started can be stopped (it is bounded by `startup_timeout`).

    `max_connections` is p2pd's connection manager's high-water mark (None: p2pd's own, 512): above it the
    daemon closes its oldest idle-graced connections down to three quarters of it, and every stream on
    them ends. An aggregator with more volunteers than the mark would cut their long-polls every few
    minutes, so it sets a higher one (hivemind's `P2P.create` takes no such argument).
    """
    made: list[P2P] = []
    limits = {} if max_connections is None else {"connHi": max_connections, "connLo": max_connections * 3 // 4}

    class _RecordedP2P(P2P):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

        @staticmethod
        def _make_process_args(*args: Any, **kwargs: Any) -> list[str]:
            return P2P._make_process_args(*args, **kwargs, **limits)

    starting = asyncio.ensure_future(_RecordedP2P.create(**p2p_kwargs))
    try:
        return await asyncio.shield(starting)
    except BaseException:
        if not starting.done():
            await asyncio.wait([starting])
        if not starting.cancelled() and starting.exception() is None:
            made.append(starting.result())
        for half_made in made:
            await half_made.shutdown()
        raise


async def start_node(
    *,
    initial_peers: Sequence[str | Multiaddr] = (),
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: Path | None = None,
    client_mode: bool = False,
    signer: Identity | None = None,
    bootstrap_timeout_s: float = 30.0,
    max_connections: int | None = None,
) -> Node:
    """A DHT node (and its p2pd) with potluck's signed-record validator, bootstrapped from `initial_peers`.

    `identity_path` keeps the libp2p peer id stable across restarts (the aggregator's multiaddr must
    not change); it is created on first use. `signer` signs the DHT records this node stores under its
    Ed25519 key (aggregators); nodes that only read leave it out. `max_connections`: see create_p2p.
    JoinError when no initial peer answers in time; nothing is left running then.
    """
    kwargs: dict[str, Any] = {"host_maddrs": list(host_maddrs), "startup_timeout": bootstrap_timeout_s}
    if initial_peers:
        kwargs["initial_peers"] = [str(p) for p in initial_peers]
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["identity_path"] = str(identity_path)
    if client_mode:
        kwargs["dht_mode"] = "client"
    try:
        p2p = await create_p2p(max_connections=max_connections, **kwargs)
    except Exception as e:  # hivemind raises P2PDaemonError and others when p2pd cannot start or bootstrap
        if initial_peers:
            raise JoinError(_unreachable(initial_peers, _reason(e))) from e
        raise
    try:
        dht = await asyncio.wait_for(
            DHTNode.create(
                p2p=p2p,
                initial_peers=[str(p) for p in initial_peers] or None,
                client_mode=client_mode,
                record_validator=Ed25519RecordValidator(signer),
                bootstrap_timeout=bootstrap_timeout_s,
                ensure_bootstrap_success=bool(initial_peers),
            ),
            timeout=bootstrap_timeout_s + 15,
        )
    except BaseException as e:
        await p2p.shutdown()
        if isinstance(e, Exception) and initial_peers:
            raise JoinError(_unreachable(initial_peers, _reason(e))) from e
        raise
    return Node(dht=dht, p2p=p2p)


def _reason(e: BaseException) -> str:
    """p2pd's or hivemind's first line, without p2pd's timestamps."""
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return "no answer in time"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    # p2pd gives no type or code for why it failed: its text is trimmed for the user's line, never branched on
    return re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text.removeprefix("Daemon failed to start: "))


def _unreachable(initial_peers: Sequence[str | Multiaddr], reason: str) -> str:
    addresses = ", ".join(str(p) for p in initial_peers)
    return (
        f"could not join through {addresses}: {reason}; check that aggregator-server is running there and that "
        "its port is open (try: potluck doctor --join ADDR)"
    )
