"""HTTP exhaustion, against a real aggregator process: 2,000 half-open connections to its status page at a 1,024
descriptor limit leave its libp2p requests answered and its log small, and the page answers again afterwards.

Once, 1,030 half-sent requests filled a node's 1,024 descriptors: the streams p2pd hands over a unix socket failed
with "Too many open files" and the log grew 309 MB in 65 s. The attacker (potluck.lab.attackers.http_flood, for
the red team) is a process of its own, spread over 50 loopback addresses as a botnet would be, so that the
page's cap in all is what holds (its cap per address is tested in tests/web), and it reopens every connection the
page closes; some of its connections send malformed requests, each of which the page logs.
"""

import asyncio
import contextlib
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from potluck.cli.log_limit import MAX_PER_WINDOW, WINDOW_S
from potluck.lab.children import start_child
from potluck.protocol.client import AggregatorLink, LinkError
from potluck.protocol.identity import generate_identity
from potluck.protocol.node import parse_join_address, peer_id_of, start_node
from tests.integration.swarm_helpers import Node, Nodes, _pump, free_port, wait_until

pytestmark = [
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="prlimit, and all of 127/8 routed to this machine"),
]

DESCRIPTOR_LIMIT = 1024  # a common default soft limit, here the hard one too: the node cannot raise it
CONNECTIONS = 2000
SPREAD = 50  # source addresses, 40 connections each: the page's 256 in all fill before any address has its 32
INVALID = 200  # of them, first, sending malformed requests (each a 400 and a warning line) again and again
INVALID_LINE = "Invalid HTTP request received."  # uvicorn's warning for each
# how long the flood is held after the stall, downloading the state again and again (manifest and chunks, each a
# libp2p stream)
HOLD_S = 5.0
# the node stops for a moment (closing a round, a collection) while connections keep arriving: they queue in the
# kernel, and the loop that comes back accepts them at once, before the page's caps can close any
STALL_S = 2.0
FETCH_EVERY_S = 0.5
# Back to back, about 1 in 1,600 downloads ends early ("stream ended after N of M STATE body bytes") with no flood
# at all; one such is no sign of starvation, which fails every download from the first
MAX_FAILED_FETCHES = 1
LOG_BOUND_BYTES = 2 * 1024 * 1024
HEALTH = b"GET /api/health HTTP/1.1\r\nHost: page\r\nConnection: close\r\n\r\n"


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fetch_states(join: str, *, for_s: float, pid: int) -> tuple[list[int], int, list[int]]:
    """Download the run's state as a joining peer does, every FETCH_EVERY_S for `for_s` (at least once); the payload
    sizes, how many downloads failed, and the node's open descriptors after each try."""

    async def fetch() -> tuple[list[int], int, list[int]]:
        node = await start_node(initial_peers=[join])
        try:
            link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
            sizes, failed, descriptors = [], 0, []
            until = time.monotonic() + for_s
            while not sizes or time.monotonic() < until:
                try:
                    _, payload, _ = await link.fetch_state(generate_identity().public_key)
                    sizes.append(len(payload))
                except LinkError:
                    failed += 1
                    if failed > MAX_FAILED_FETCHES:
                        raise
                descriptors.append(_open_descriptors(pid))
                await asyncio.sleep(FETCH_EVERY_S)  # a joiner's pace, not a benchmark's
            return sizes, failed, descriptors
        finally:
            await node.shutdown()

    return asyncio.run(asyncio.wait_for(fetch(), for_s + 60))


def _stall(pid: int, *, for_s: float) -> None:
    """Stop the process for `for_s`, as a busy event loop would be, then let it go on."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(for_s)  # the length of the stall, not a wait for anything
    finally:
        os.kill(pid, signal.SIGCONT)


def _page_answers(port: int) -> bool:
    """Whether the page answers one request from an address the attacker does not use."""

    async def ask() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.1", 0))
        try:
            writer.write(HEALTH)
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    try:
        return asyncio.run(ask()).startswith(b"HTTP/1.1 200")
    except (OSError, asyncio.TimeoutError):
        return False


def _attacker(nodes: Nodes, page_port: int) -> Node:
    """The flood as a child of its own, stopped with the test's nodes."""
    args = ["--port", str(page_port), "--connections", str(CONNECTIONS), "--spread", str(SPREAD)]
    args += ["--invalid", str(INVALID)]
    module = "potluck.lab.attackers.http_flood"
    child = start_child("http-flood", args, work_dir=nodes.work_dir, threads=1, module=module)
    attacker = Node(child=child)
    threading.Thread(target=_pump, args=(child, attacker.events), daemon=True).start()
    nodes.started.append(attacker)
    return attacker


@pytest.mark.timeout(150)
def test_half_open_connections_at_a_1024_descriptor_limit_leave_libp2p_answered_and_the_log_small(
    nodes: Nodes,
) -> None:
    # Prepare: an aggregator with its page, held to 1,024 descriptors (soft and hard) once it is up
    began = time.monotonic()
    page_port = free_port()
    aggregator = nodes.aggregator(extra=("--http-port", str(page_port)))
    join = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    ready_s = time.monotonic() - began
    pid = aggregator.child.process.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT))
    calm_sizes, _, _ = _fetch_states(join, for_s=0, pid=pid)
    log_before = Path(aggregator.child.log_path).stat().st_size
    assert _page_answers(page_port)

    # Execute: hold the flood, and download the state through it
    attacker = _attacker(nodes, page_port)
    attack_began = time.monotonic()
    flooding = attacker.next_event(lambda e: e.get("event") == "flooding", timeout_s=60)
    flood_began = time.monotonic()
    _stall(pid, for_s=STALL_S)
    sizes, failed, descriptors = _fetch_states(join, for_s=HOLD_S, pid=pid)
    attacker.child.process.terminate()
    stopped = attacker.next_event(lambda e: e.get("event") == "stopped", timeout_s=30)
    attack_s = time.monotonic() - attack_began
    wait_until(lambda: _page_answers(page_port), timeout_s=20, what="the status page to answer after the flood")
    log_growth = Path(aggregator.child.log_path).stat().st_size - log_before

    # Assert
    print(
        f"flood: {flooding} -> {stopped}; aggregator descriptors {min(descriptors)}-{max(descriptors)} (limit "
        f"{DESCRIPTOR_LIMIT}); {len(sizes)} state fetches ({failed} failed); log grew {log_growth} bytes; the "
        f"aggregator ready {ready_s:.1f} s in, the attacker started "
        f"{attack_began - began:.1f} s in, its first pass {flood_began - attack_began:.1f} s, the flood held "
        f"{time.monotonic() - flood_began:.1f} s"
    )
    assert flooding["attempts"] >= CONNECTIONS
    assert stopped["closed_by_server"] > 0, stopped  # the page's caps turned connections away
    assert resource.prlimit(pid, resource.RLIMIT_NOFILE) == (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT)
    # libp2p downloads kept being answered in full during the flood
    assert len(sizes) >= HOLD_S / FETCH_EVERY_S / 4 and sizes == calm_sizes * len(sizes), (sizes, failed)
    assert max(descriptors) < DESCRIPTOR_LIMIT // 2
    log = Path(aggregator.child.log_path).read_text(errors="replace")
    assert "Too many open files" not in log, log[-3000:]
    # hundreds were sent; a few per window of the log's repeat filter were kept
    assert 0 < log.count(INVALID_LINE) <= MAX_PER_WINDOW * (attack_s / WINDOW_S + 2), log[-3000:]
    assert log_growth < LOG_BOUND_BYTES, log[-3000:]
