"""Bad updates and other protocol versions sent to a real aggregator are refused, with the reason said and logged."""

import asyncio
import dataclasses
from typing import Any

import pytest

from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.client import AggregatorLink, AggregatorUnreachable
from potluck.protocol.envelope import SignedUpdate, sign_update
from potluck.protocol.identity import generate_identity
from potluck.protocol.messages import SUBMIT_HANDLER
from potluck.protocol.node import parse_join_address, peer_id_of, start_node
from potluck.protocol.wire import MessageKind, PeerRefusedError, RefusalCode, read_frame_from_stream
from tests.integration.swarm_helpers import Nodes, signed_test_update

pytestmark = [pytest.mark.network, pytest.mark.slow]


async def _submit_bad_updates(join: str) -> dict[str, Any]:
    """Fetch the state like a peer, then send three bad updates; return the receipts by case."""
    honest, forger = generate_identity(), generate_identity()
    node = await start_node(initial_peers=[join])
    try:
        link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
        state, state_payload, _ = await link.fetch_state(honest.public_key)
        good, payload = signed_test_update(state, state_payload, sender=honest, tokens=1024)
        header = good.header
        cases = {
            # names the honest key, signed by another one
            "wrong key": (SignedUpdate(header=header, signature=forger.sign(header.signed_bytes())), payload),
            # properly signed, for a round that is not open
            "wrong round": (sign_update(dataclasses.replace(header, round=header.round + 3), honest), payload),
            # properly signed header, one payload byte changed in transit
            "tampered payload": (sign_update(header, honest), payload[:-1] + bytes([payload[-1] ^ 1])),
        }
        # the honest update last, twice: the second is a retry whose first reply was "lost"
        cases |= {"honest": (good, payload), "honest again": (good, payload)}
        receipts = {}
        for name, (update, body) in cases.items():
            receipt, _ = await link.submit(update, body)
            receipt.verify(state.header.aggregator_public_key)
            receipts[name] = receipt.receipt
        return receipts
    finally:
        await node.shutdown()


@pytest.mark.timeout(150)
def test_bad_updates_are_rejected_and_logged_and_a_retried_good_one_is_accepted_once(nodes: Nodes) -> None:
    # Prepare
    aggregator = nodes.aggregator(rounds=3, local_steps=8, inner__warmup_steps=4, data__max_bytes=400_000)
    join = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    # Execute
    try:
        receipts = asyncio.run(asyncio.wait_for(_submit_bad_updates(join), 60))
    except AggregatorUnreachable as e:  # seen once in CI (a stream closed with no reply): keep what the server said
        raise AssertionError(f"{e}; the aggregator's log:\n{aggregator.log()}") from e
    # Assert: each bad one is refused, naming the check that caught it; the honest one and its retry are accepted
    honest, again = receipts.pop("honest"), receipts.pop("honest again")
    assert honest.accepted and again.accepted and again.tokens_credited == honest.tokens_credited == 1024
    assert not any(r.accepted for r in receipts.values())
    assert receipts["wrong key"].reason.startswith("signature: ")
    assert receipts["wrong round"].reason.startswith("round: update is for round 3, the open round is 0")
    assert (
        receipts["tampered payload"].reason.startswith("signature: ")
        and "sha256" in receipts["tampered payload"].reason
    )
    for reason in (r.reason for r in receipts.values()):
        aggregator.next_event(
            lambda e, reason=reason: e.get("event") == "rejected" and e["reason"] == reason, timeout_s=10
        )
    log = aggregator.log()
    assert log.count("rejected update from") == 3


async def _speak_another_version(join: str, version: int) -> str:
    """Open a submit stream and send a frame header of protocol `version`; return the aggregator's refusal."""
    node = await start_node(initial_peers=[join])
    try:
        _, reader, writer = await node.p2p.call_binary_stream_handler(
            peer_id_of(parse_join_address(join)), SUBMIT_HANDLER
        )
        try:
            writer.write(b"PLK" + bytes([version, MessageKind.SUBMIT]) + (100).to_bytes(8, "big"))
            await writer.drain()
            with pytest.raises(PeerRefusedError) as refusal:
                await read_frame_from_stream(reader, max_body_bytes=4096, expected_kinds={MessageKind.SUBMIT_REPLY})
            assert refusal.value.code is RefusalCode.VERSION_MISMATCH
            return str(refusal.value)
        finally:
            writer.close()
    finally:
        await node.shutdown()


@pytest.mark.timeout(120)
def test_a_peer_of_another_protocol_version_is_refused_naming_both_versions(nodes: Nodes) -> None:
    aggregator = nodes.aggregator(rounds=3, local_steps=8, inner__warmup_steps=4, data__max_bytes=400_000)
    join = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]

    newer = asyncio.run(asyncio.wait_for(_speak_another_version(join, PROTOCOL_VERSION + 1), 60))
    older = asyncio.run(asyncio.wait_for(_speak_another_version(join, PROTOCOL_VERSION - 1), 60))

    assert f"speaks protocol v{PROTOCOL_VERSION}, you sent v{PROTOCOL_VERSION + 1}" in newer
    assert "this node must upgrade" in newer
    assert f"you sent v{PROTOCOL_VERSION - 1}; upgrade potluck from where you installed it" in older
