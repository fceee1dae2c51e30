"""Admission by work against real processes: a stranger's manifest requests under random keys do not hold rounds.

An aggregator and two peers run; once the run is under way (past its start-up rounds), a fake joiner asks for
the manifest under a fresh key five times a second. Every later round must still close when the two peers
have reported, far inside its deadline. Hard timeout; no p2pd left (the `nodes` fixture checks).
"""

import asyncio
import threading
from concurrent.futures import Future

import pytest

from potluck.lab.attackers.fake_joiners import FakeJoins, fake_joins
from tests.integration.swarm_helpers import Nodes

pytestmark = [pytest.mark.network, pytest.mark.slow]

FAST = {"local_steps": 4, "inner__warmup_steps": 2, "inner__batch_size": 8, "data__max_bytes": 200_000}
DEADLINE_S = 60.0


def _start_fake_joins(join: str, stop: threading.Event) -> "Future[FakeJoins]":
    """Run the attacker on its own event loop in a thread; its result (or error) comes back in the future."""
    result: Future[FakeJoins] = Future()

    def run() -> None:
        try:
            result.set_result(asyncio.run(fake_joins(join, every_s=0.2, stop=stop)))
        except BaseException as e:  # noqa: BLE001 - handed to the test, which re-raises it
            result.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return result


@pytest.mark.timeout(150)
def test_fake_joiners_do_not_make_rounds_wait_for_them(nodes: Nodes) -> None:
    # Prepare: a run past its start-up rounds (which wait for joiners too: attendance.py)
    aggregator = nodes.aggregator(rounds=4, round_deadline_s=DEADLINE_S, **FAST)
    join = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    peers = [nodes.peer(name, join) for name in ("a", "b")]
    aggregator.next_event(lambda e: e.get("event") == "round" and e["round"] == 1, timeout_s=90)
    stop = threading.Event()
    attacker = _start_fake_joins(join, stop)
    try:
        # Execute: the rest of the run under fake joins
        rounds = [
            aggregator.next_event(lambda e, r=r: e.get("event") == "round" and e["round"] == r, timeout_s=DEADLINE_S)
            for r in (2, 3)
        ]
    finally:
        stop.set()
        done = attacker.result(timeout=30)
    # Assert: the aggregator answered the fake joiners, and no round waited for them
    assert done.answered >= 3, done
    assert [r["closed_by"] for r in rounds] == ["all-reported"] * 2
    assert all(r["round_s"] < DEADLINE_S / 3 for r in rounds), [r["round_s"] for r in rounds]
    assert all(len(r["accepted"]) == 2 for r in rounds)
    assert all(p.wait_exit(timeout_s=60) == 0 for p in peers)
