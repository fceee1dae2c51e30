"""Fake joiners: manifest requests under random keys, as a stranger sends them to make rounds wait.

RED TEAM ONLY. A manifest (or state) request names the asker's public key and proves nothing: anyone
can send one under a fresh key every few seconds. Before admission by work, each such key joined the
peers the open round waited for, so rounds that closed in a second on "all reported" closed at their
deadline instead. `fake_joins` sends them against an aggregator until told to stop; the aggregator
must answer them and go on closing its rounds when its real members have reported.

`python -m potluck.lab.attackers.fake_joiners --join ADDR [--every 1]` sends them until SIGTERM or SIGINT,
printing a JSON `attack` line with the counts each second.
"""

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from potluck.lab.attackers.command import attacker_parser
from potluck.protocol.client import AggregatorLink, LinkError
from potluck.protocol.node import create_p2p, dial

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class FakeJoins:
    """What a fake-joiner run did: requests sent, and how many the aggregator answered with its manifest."""

    sent: int = 0
    answered: int = 0


async def fake_joins(
    join: str, *, every_s: float, stop: threading.Event, timeout_s: float = 10.0, counts: FakeJoins | None = None
) -> FakeJoins:
    """Ask the aggregator at `join` (a /p2p/ multiaddr) for its manifest under a fresh random key every `every_s`
    seconds, until `stop` is set; the counts (kept in `counts` as they go, when given). The node this starts is
    shut down however it ends."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    done = counts if counts is not None else FakeJoins()
    p2p = await create_p2p(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        peer_id = PeerID.from_base58(join.rsplit("/p2p/", 1)[1])
        await dial(p2p, peer_id, [Multiaddr(join.rsplit("/p2p/", 1)[0])])
        link = AggregatorLink(p2p, peer_id)
        while not stop.is_set():
            done.sent += 1
            try:
                await link.fetch_manifest(os.urandom(32), timeout_s=timeout_s)
                done.answered += 1
            except LinkError as e:
                logger.debug("fake join refused: %s", e)
            await asyncio.sleep(every_s)
    finally:
        await p2p.shutdown()
    return done


async def _run(join: str, every_s: float) -> None:
    """Fake joins until SIGTERM or SIGINT, the counts printed each second once the first is sent, and at the end.

    A node that fails to start (its daemon is slow on a loaded machine) is started again.
    """
    stop, counts = threading.Event(), FakeJoins()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def keep_up() -> None:
        while not stop.is_set():
            try:
                await fake_joins(join, every_s=every_s, stop=stop, counts=counts)
            except Exception as e:  # noqa: BLE001 - p2pd's start-up errors: try again
                logger.warning("fake joiner's node failed (%s); starting it again", e)
                await asyncio.sleep(1.0)

    task = asyncio.create_task(keep_up())
    while not task.done():
        if counts.sent:
            print(json.dumps({"event": "attack", "time_s": time.time(), **asdict(counts)}), flush=True)
        await asyncio.wait({task}, timeout=1.0)
    await task
    print(json.dumps({"event": "stopped", "time_s": time.time(), **asdict(counts)}), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """The attacker's command line (red team only)."""
    parser = attacker_parser("potluck.lab.attackers.fake_joiners", __doc__)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between two fake joins")
    args = parser.parse_args(argv)
    asyncio.run(_run(args.join, args.every))


if __name__ == "__main__":
    main()
