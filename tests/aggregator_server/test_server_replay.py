"""The crash window between a round's ledger commit and its checkpoint: the restarted aggregator closes the
round exactly as the ledger recorded it, and appends nothing twice. In process, no network."""

import asyncio
from pathlib import Path

from potluck.aggregator_server.checkpoint import spool_update
from potluck.aggregator_server.server import AggregatorServer, ServerOptions
from potluck.aggregator_server.validation import decode_update
from potluck.incentives.ledger import Ledger
from potluck.incentives.merkle import merkle_root
from potluck.protocol.config import RunConfig
from potluck.protocol.envelope import (
    MAX_AGGREGATE_ENVELOPE_BYTES,
    MAX_STATE_ENVELOPE_BYTES,
    SignedAggregate,
    SignedState,
)
from potluck.protocol.identity import generate_identity
from potluck.protocol.messages import unpack_envelope
from tests.integration.swarm_helpers import signed_test_update

CFG = RunConfig().with_overrides({"rounds": 3, "data.max_bytes": 200_000}, source="test")
AGGREGATOR = generate_identity()
SENDERS = [generate_identity() for _ in range(3)]


def _server(state_dir: Path) -> AggregatorServer:
    return AggregatorServer(
        CFG, AGGREGATOR, ServerOptions(state_dir=state_dir, eval_batches=1), on_event=lambda e: None
    )


async def _accept_three_then_commit_without_checkpoint(state_dir: Path):  # noqa: ANN202 - the SignedHead
    first = _server(state_dir)
    envelope, payload = unpack_envelope(
        (await first._served_state()).state_body(), max_envelope_bytes=MAX_STATE_ENVELOPE_BYTES
    )
    state = SignedState.from_bytes(envelope)
    for i, sender in enumerate(SENDERS):
        update, update_payload = signed_test_update(state, payload, sender=sender, tokens=1_000 * (i + 1), seed=i)
        decoded, rejection = decode_update(update_payload, codec=first.codec, spec=first.master.spec)
        assert rejection is None and decoded is not None
        wire = update.to_bytes()
        spool_update(state_dir, round=0, public_key=sender.public_key, envelope=wire, payload=update_payload)
        first._accept(update, wire, update_payload, decoded)
    head = await first._judge_and_record(first.current)  # then the process dies: no checkpoint, nothing published
    first.ledger.close()
    return head


def test_a_round_in_the_ledger_but_not_checkpointed_is_closed_as_recorded(tmp_path: Path) -> None:
    # Prepare: round 0's rows committed, then a crash before its checkpoint
    head = asyncio.run(_accept_three_then_commit_without_checkpoint(tmp_path))
    assert head is not None and head.round == 0
    with Ledger.open(tmp_path / "ledger.sqlite", read_only=True) as ledger:
        rows = ledger.rows(round_index=0)
    # Execute: the restart on the same directory closes the round
    second = _server(tmp_path)
    assert (second.master.round, len(second.current.accepted)) == (0, 3)
    asyncio.run(second._close("deadline"))
    # Assert: the same round, once in the ledger; the aggregate commits to the recorded rows and head
    assert second.master.round == 1
    assert [h.round for h in second.ledger.heads()] == [0] and second.ledger.rows() == rows
    envelope, _ = unpack_envelope(second.aggregates[0], max_envelope_bytes=MAX_AGGREGATE_ENVELOPE_BYTES)
    header = SignedAggregate.from_bytes(envelope).header
    kept = [r.entry for r in rows if r.entry.accepted]
    assert header.ledger_head == head.head_hash
    assert header.updates_root == merkle_root([e.update_digest for e in kept])
    assert dict(header.contributors) == {e.peer_public_key: int(e.weight) for e in kept}
    second.ledger.close()
