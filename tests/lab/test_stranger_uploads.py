"""The stranger-upload attacker: validly signed updates of another run, each by a key of its own."""

import asyncio

from potluck.lab.attackers.stranger_uploads import flood, stranger_update
from potluck.protocol.client import AggregatorUnreachable
from potluck.protocol.envelope import Receipt, SignedReceipt, SignedUpdate, sign_receipt
from potluck.protocol.identity import generate_identity

AGGREGATOR = generate_identity()


def test_each_stranger_update_is_validly_signed_by_a_key_of_its_own() -> None:
    updates = [stranger_update(run_id="elsewhere") for _ in range(3)]

    for update, payload in updates:
        update.verify()
        update.verify_payload(payload)
    assert len({u.header.peer_public_key for u, _ in updates}) == 3
    assert {u.header.run_id for u, _ in updates} == {"elsewhere"}


def test_a_flood_counts_the_answers_and_the_sends_that_failed() -> None:
    calls = 0

    async def send(update: SignedUpdate, payload: bytes) -> SignedReceipt:
        nonlocal calls
        calls += 1
        if calls % 5 == 0:
            raise AggregatorUnreachable("dropped")
        h = update.header
        receipt = Receipt(
            run_id="r",
            config_hash="0" * 64,
            round=0,
            peer_public_key=h.peer_public_key,
            aggregator_public_key=AGGREGATOR.public_key,
            update_sha256=h.digest(),
            tokens_credited=0,
            accepted=False,
            reason="run: another run",
            timestamp_s=0.0,
        )
        return sign_receipt(receipt, AGGREGATOR)

    result = asyncio.run(flood(send, count=20, concurrency=3))

    assert (result.sent, result.answers, result.failed) == (20, {"run": 16}, 4)
