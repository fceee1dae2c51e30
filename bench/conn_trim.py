"""Does a libp2p daemon close honest peers' connections above its connection limit? Watch one that does.

A hub node is started as the aggregator starts its own (`create_p2p(max_connections=...)`), then `--nodes` client
nodes dial it; every 15 s the hub's connected peers are counted, and a sample of the clients is asked whether they
are still connected to it. p2pd's connection manager leaves connections alone for a 2-minute grace, so watch for
longer than that.

    python -m bench.conn_trim --max-connections 64 --nodes 100 --watch 240
"""

from __future__ import annotations

import argparse
import asyncio
import time

from hivemind.utils.multiaddr import Multiaddr

from potluck.protocol.node import create_p2p, dial


async def watch(max_connections: int | None, nodes: int, watch_s: float) -> None:
    """Start the hub and its clients, print the counts as they change, stop everything."""
    hub = await create_p2p(max_connections=max_connections)
    # p2pd dials an address without its /p2p/ part
    addresses = [Multiaddr(str(m).rsplit("/p2p/", 1)[0]) for m in await hub.get_visible_maddrs()]
    clients = []
    try:
        for _ in range(nodes):
            client = await create_p2p()
            await dial(client, hub.peer_id, addresses)
            clients.append(client)
        started = time.monotonic()
        while time.monotonic() - started < watch_s:
            seen = len(await hub.list_peers())
            sample = clients[:20]
            still = sum([any(p.peer_id == hub.peer_id for p in await c.list_peers()) for c in sample])
            print(
                f"{time.monotonic() - started:6.0f} s: the hub has {seen} peers; {still}/{len(sample)} sampled "
                "clients are still connected to it",
                flush=True,
            )
            await asyncio.sleep(15)
    finally:
        for client in clients:
            await client.shutdown()
        await hub.shutdown()


def main() -> None:
    """Parse the flags and watch."""
    p = argparse.ArgumentParser(
        prog="python -m bench.conn_trim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--max-connections", type=int, default=64, help="the hub's limit (0: p2pd's own, 512)")
    p.add_argument("--nodes", type=int, default=100, help="client nodes that dial the hub")
    p.add_argument("--watch", type=float, default=240.0, help="seconds to watch once every client is connected")
    args = p.parse_args()
    asyncio.run(watch(args.max_connections or None, args.nodes, args.watch))


if __name__ == "__main__":
    main()
