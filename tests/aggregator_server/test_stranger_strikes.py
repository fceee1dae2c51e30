"""Stranger strikes (an attack of issue 22): 1,000 uploads, each signed by a fresh key and failing the run check,
sent through the aggregator's real upload handler. They must leave no record that grows with them (no strike,
no ban, no ledger row, a bounded number of reports) and must not slow honest uploads down.

The bound: a key with no accepted update in the run adds 0 rows to the ban store and 0 to the ledger, and
at most MAX_STRANGER_REPORTS refusals a round are reported (log, events, status page); strangers' uploads
are only counted beyond that.
"""

import asyncio
import statistics
import time
from pathlib import Path

from potluck.aggregator_server.members import MAX_STRANGER_REPORTS
from potluck.aggregator_server.reputation import BANS_FILE
from potluck.events import Event, UpdateReceived, UpdateRejected
from potluck.lab.attackers.stranger_uploads import flood
from potluck.protocol.envelope import SignedReceipt, SignedUpdate
from potluck.protocol.identity import generate_identity
from tests.aggregator_server.in_process import make_server, state, submit
from tests.integration.swarm_helpers import signed_test_update

FLOOD = 1_000
HONEST_PER_PHASE = 4  # honest uploads timed before, during and after the flood


def _store_bytes(state_dir: Path) -> int:
    """The ban store's size on disk, its write-ahead log included."""
    return sum(p.stat().st_size for p in state_dir.glob(f"{BANS_FILE}*"))


def test_a_thousand_stranger_uploads_leave_no_record_and_do_not_slow_honest_ones(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, list[float]], object]:
        # Prepare
        server = make_server(tmp_path)
        events: list[Event] = []
        server.on_event = events.append
        signed_state, state_payload = await state(server)
        honest = [generate_identity() for _ in range(3 * HONEST_PER_PHASE)]
        uploads = [
            signed_test_update(signed_state, state_payload, sender=peer, tokens=1_000, seed=i)
            for i, peer in enumerate(honest)
        ]
        store_before = _store_bytes(tmp_path)

        answered = asyncio.Condition()
        strangers = 0

        async def send(update: SignedUpdate, payload: bytes) -> SignedReceipt:
            nonlocal strangers
            receipt = await submit(server, update, payload)
            async with answered:
                strangers += 1
                answered.notify_all()
            return receipt

        async def timed(phase: list[tuple[SignedUpdate, bytes]], *, spread: bool = False) -> list[float]:
            """Each upload's seconds; `spread`: the i-th once the flood is i/(n+1) through, to see all of it."""
            seconds = []
            for i, (update, payload) in enumerate(phase, start=1):
                if spread:
                    mark = i * FLOOD // (len(phase) + 1)
                    async with answered:
                        while strangers < mark:
                            await answered.wait()
                started = time.perf_counter()
                assert (await submit(server, update, payload)).receipt.accepted
                seconds.append(time.perf_counter() - started)
            return seconds

        n = HONEST_PER_PHASE
        # Execute
        before = await timed(uploads[:n])
        flooding = asyncio.create_task(flood(send, count=FLOOD))
        during = await timed(uploads[n : 2 * n], spread=True)
        result = await flooding
        after = await timed(uploads[2 * n :])
        # Assert: every stranger refused by the run check, and nothing of them kept
        assert result.answers == {"run": FLOOD} and result.failed == 0
        assert server.reputation.strikes == {} and server.reputation.bans == {}
        assert _store_bytes(tmp_path) == store_before
        assert server.current.refused == [] and server.current.answered == {}
        refusals = [e for e in events if isinstance(e, UpdateRejected)]
        received = [e for e in events if isinstance(e, UpdateReceived) and not e.accepted]
        assert len(refusals) == len(received) == MAX_STRANGER_REPORTS
        # a member's refusal is still booked: the strangers took none of the round's refused rows
        second = signed_test_update(signed_state, state_payload, sender=honest[0], tokens=1_000, seed=99)
        assert (await submit(server, *second)).receipt.reason.startswith("duplicate:")
        assert [e.peer_public_key for e in server.current.refused] == [honest[0].public_key]
        await server.close("all-reported")  # the round's ledger rows: the honest peers' only
        rows = server.ledger.rows(round_index=0)
        members = [peer.public_key for peer in [*honest, honest[0]]]
        assert sorted(r.entry.peer_public_key for r in rows) == sorted(members)
        server.ledger.close()
        server.reputation.close()
        return {"before": before, "during": during, "after": after}, result

    latency, result = asyncio.run(asyncio.wait_for(scenario(), timeout=240))

    median = {phase: statistics.median(seconds) for phase, seconds in latency.items()}
    print(f"honest upload median (s): {median}; flood: {result}")
    # wide margins on a shared 2-core box: no lasting cost, and a flood sharing the loop costs a bounded delay
    assert median["after"] <= 2 * median["before"] + 0.25, median
    assert median["during"] <= 3 * median["before"] + 0.5, median
