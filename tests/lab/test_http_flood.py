"""The HTTP flood attacker against an in-process status page: it fills the page's caps, keeps reopening what the
page closes, and stops at once when told, also when a stop meets connects in flight."""

import asyncio
import resource
import subprocess
import sys

import pytest

from potluck.lab.attackers.http_flood import FloodCounts, flood, loopback_sources
from potluck.web import RunStatus, create_app, start_server

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="all of 127/8 routed to this machine")


def test_a_flood_fills_the_pages_caps_reconnects_and_stops_when_told() -> None:
    # Prepare: a page with room for 8 connections, 3 per address; 24 connections from 4 addresses
    async def scenario() -> tuple[FloodCounts, int, bool]:
        running = await start_server(
            create_app(RunStatus()), host="127.0.0.1", port=0, max_connections=8, max_per_address=3
        )
        stop, tried, counts = asyncio.Event(), asyncio.Event(), FloodCounts()
        try:
            attack = asyncio.create_task(
                flood(
                    "127.0.0.1",
                    running.port,
                    connections=24,
                    stop=stop,
                    counts=counts,
                    sources=loopback_sources(4),
                    reconnect_after_s=0.05,
                    invalid=2,
                    tried=tried,
                )
            )
            # Execute
            await asyncio.wait_for(tried.wait(), 20)
            while counts.closed_by_server < 50:  # connections closed at once come back: the flood goes on
                await asyncio.sleep(0.05)
            # one refused over the cap stays in the set, closing, until the loop's next turn: not held
            held_by_page = sum(not c.transport.is_closing() for c in running._server.server_state.connections)
            stop.set()
            await asyncio.wait_for(attack, 10)
        finally:
            await running.stop()
        return counts, held_by_page, attack.done()

    counts, held_by_page, stopped = asyncio.run(asyncio.wait_for(scenario(), 60))
    # Assert
    assert held_by_page <= 8
    assert counts.attempts > 24 and counts.failed == 0  # the closed ones were opened again
    assert stopped and counts.holding == 0


def test_the_attacker_says_when_it_cannot_open_that_many_files() -> None:
    # Prepare: a hard limit of 256 open files, which 2,000 connections cannot fit in
    command = [sys.executable, "-m", "potluck.lab.attackers.http_flood", "--connections", "2000", "--duration", "1"]
    # Execute
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
    )
    # Assert
    assert result.returncode == 2, result.stderr
    assert "the hard limit is 256" in result.stderr
