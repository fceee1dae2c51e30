"""Fake joiners: manifest requests under random keys, as a stranger sends them to make rounds wait.

RED TEAM ONLY. A manifest (or state) request names the asker's public key and proves nothing: anyone
can send one under a fresh key every few seconds. Before admission by work, each such key joined the
peers the open round waited for, so rounds that closed in a second on "all reported" closed at their
deadline instead. `fake_joins` sends them against an aggregator until told to stop; the aggregator
must answer them and go on closing its rounds when its real members have reported.
"""

import asyncio
import logging
import os
import threading
from dataclasses import dataclass

from potluck.protocol.client import AggregatorLink, LinkError
from potluck.protocol.node import create_p2p, dial

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class FakeJoins:
    """What a fake-joiner run did: requests sent, and how many the aggregator answered with its manifest."""

    sent: int = 0
    answered: int = 0


async def fake_joins(join: str, *, every_s: float, stop: threading.Event, timeout_s: float = 10.0) -> FakeJoins:
    """Ask the aggregator at `join` (a /p2p/ multiaddr) for its manifest under a fresh random key every `every_s`
    seconds, until `stop` is set; the counts. The node this starts is shut down however it ends."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    done = FakeJoins()
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
