"""What an aggregator must not forget when it crashes: accepted updates of the open round, and bans."""

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from potluck.protocol.client import AggregatorLink, AggregatorUnreachable
from potluck.protocol.envelope import new_nonce, sign_update
from potluck.protocol.identity import Identity, generate_identity
from potluck.protocol.node import parse_join_address, peer_id_of, start_node
from tests.integration.swarm_helpers import Nodes, free_port, signed_test_update

pytestmark = [pytest.mark.network, pytest.mark.slow]

SETTINGS = dict(rounds=3, round_deadline_s=300, local_steps=8, inner__warmup_steps=4, data__max_bytes=400_000)


async def _submit(join: str, *, watcher: Identity, sender: Identity, update_bytes: bytes | None = None):  # noqa: ANN202
    """Register `watcher` as expected (so the round stays open), then submit one update signed by `sender`.

    Returns (receipt, the update's wire bytes, payload) so the very same update can be sent again.
    """
    node = await start_node(initial_peers=[join])
    try:
        link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
        state, state_payload, _ = await link.fetch_state(watcher.public_key)
        update, payload = signed_test_update(state, state_payload, sender=sender, tokens=2048, seed=1)
        receipt, _ = await link.submit(update, payload)
        return receipt.receipt, update, payload
    finally:
        await node.shutdown()


async def _resubmit(join: str, update, payload: bytes):  # noqa: ANN001, ANN202
    node = await start_node(initial_peers=[join])
    try:
        link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
        receipt, _ = await link.submit(update, payload)
        return receipt.receipt
    finally:
        await node.shutdown()


@pytest.mark.timeout(200)
def test_an_accepted_update_survives_a_crash_of_the_aggregator(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: an update is accepted while the round still waits for another peer
    port, state_dir = free_port(), tmp_path / "durable"
    first = nodes.aggregator("first", state_dir=state_dir, port=port, **SETTINGS)
    join = first.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    sender = generate_identity()
    accepted, update, payload = asyncio.run(
        asyncio.wait_for(_submit(join, watcher=generate_identity(), sender=sender), 60)
    )
    assert accepted.accepted
    # Execute: crash before the round closes, restart on the same directory
    first.kill()
    second = nodes.aggregator("second", state_dir=state_dir, port=port, **SETTINGS)
    ready = second.next_event(lambda e: e.get("event") == "ready", timeout_s=90)
    # Assert: the round resumes with the update in it; sending it again is recognised, not counted twice
    assert (ready["round"], ready["spooled_updates"]) == (0, 1)
    again = asyncio.run(asyncio.wait_for(_resubmit(join, update, payload), 60))
    assert again.accepted and again.tokens_credited == accepted.tokens_credited == 2048


async def _submit_retrying(link: AggregatorLink, update, payload: bytes):  # noqa: ANN001, ANN202
    """Submit, sending the same update again when the reply is lost, as a peer does (no second strike)."""
    for _ in range(2):
        with contextlib.suppress(AggregatorUnreachable):
            receipt, _ = await link.submit(update, payload)
            return receipt.receipt
    receipt, _ = await link.submit(update, payload)
    return receipt.receipt


async def _strike_out_then_submit(join: str, *, offender: Identity, strikes: int) -> list:  # noqa: ANN401
    """Send a good update (the offender becomes a member: only members are struck), `strikes` other updates
    for the same round, then the good one again; return all receipts."""
    node = await start_node(initial_peers=[join])
    try:
        link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
        state, state_payload, _ = await link.fetch_state(generate_identity().public_key)
        good, payload = signed_test_update(state, state_payload, sender=offender, tokens=2048)
        updates = [
            sign_update(dataclasses.replace(good.header, codec="int8", nonce=new_nonce()), offender)
            for _ in range(strikes)
        ]
        receipts = []
        for update in [good, *updates, good]:
            receipts.append(await _submit_retrying(link, update, payload))
        return receipts
    finally:
        await node.shutdown()


@pytest.mark.timeout(200)
def test_a_banned_key_stays_banned_after_a_restart(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: a member whose updates fail three checks in a round is banned (ban_after_rejections = 3)
    port, state_dir = free_port(), tmp_path / "durable"
    first = nodes.aggregator("first", state_dir=state_dir, port=port, **SETTINGS)
    join = first.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    offender = generate_identity()
    before = asyncio.run(asyncio.wait_for(_strike_out_then_submit(join, offender=offender, strikes=3), 60))
    assert before[0].accepted
    assert [r.reason.split(":")[0] for r in before[1:]] == ["duplicate", "duplicate", "duplicate", "banned"]
    first.next_event(lambda e: e.get("event") == "banned", timeout_s=10)
    # Execute
    first.kill()
    second = nodes.aggregator("second", state_dir=state_dir, port=port, **SETTINGS)
    second.next_event(lambda e: e.get("event") == "ready", timeout_s=90)
    after = asyncio.run(asyncio.wait_for(_strike_out_then_submit(join, offender=offender, strikes=0), 60))
    # Assert: even a good update is refused, and the operator sees why
    assert not after[0].accepted and after[0].reason.startswith("banned: ")
    listed = subprocess.run(
        [sys.executable, "-m", "potluck", "bans", "list", "--state-dir", str(state_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    bans = json.loads(listed.stdout)["bans"]
    assert [b["fingerprint"] for b in bans] == [offender.fingerprint]
