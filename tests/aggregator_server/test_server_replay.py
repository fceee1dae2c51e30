"""The crash window between a round's ledger commit and its checkpoint: the restarted aggregator closes the
round exactly as the ledger recorded it, and appends nothing twice. In process, no network."""

import asyncio
from pathlib import Path

import pytest

from potluck.aggregator_server.keeper import Upload
from potluck.aggregator_server.server import AggregatorServer, ServerOptions
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
from tests.aggregator_server.in_process import aggregate_body
from tests.integration.swarm_helpers import signed_test_update

CFG = RunConfig().with_overrides({"rounds": 3, "data.max_bytes": 200_000}, source="test")
AGGREGATOR = generate_identity()
SENDERS = [generate_identity() for _ in range(3)]


def _server(state_dir: Path) -> AggregatorServer:
    return AggregatorServer(
        CFG, AGGREGATOR, ServerOptions(state_dir=state_dir, eval_batches=1), on_event=lambda e: None
    )


class _Crash(Exception):
    """The process dies here."""


def _crash(*_: object) -> None:
    raise _Crash


async def _accept_three_then_commit_without_checkpoint(state_dir: Path):  # noqa: ANN202 - the SignedHead
    first = _server(state_dir)
    envelope, payload = unpack_envelope(
        (await first.served_state()).state_body(), max_envelope_bytes=MAX_STATE_ENVELOPE_BYTES
    )
    state = SignedState.from_bytes(envelope)
    for i, sender in enumerate(SENDERS):
        update, update_payload = signed_test_update(state, payload, sender=sender, tokens=1_000 * (i + 1), seed=i)
        upload = Upload(update=update, envelope=update.to_bytes(), payload=update_payload)
        assert first.keeper.submit(upload).accepted  # spooled, then accepted
    first.keeper.checkpoint = _crash  # type: ignore[method-assign]
    with pytest.raises(_Crash):  # the ledger commits the round, then the process dies: no checkpoint
        first.keeper.close("deadline")
    head = first.ledger.head()
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
    asyncio.run(second.close("deadline"))
    # Assert: the same round, once in the ledger; the aggregate commits to the recorded rows and head
    assert second.master.round == 1
    assert [h.round for h in second.ledger.heads()] == [0] and second.ledger.rows() == rows
    envelope, _ = unpack_envelope(aggregate_body(second, 0), max_envelope_bytes=MAX_AGGREGATE_ENVELOPE_BYTES)
    header = SignedAggregate.from_bytes(envelope).header
    kept = [r.entry for r in rows if r.entry.accepted]
    assert header.ledger_head == head.head_hash
    assert header.updates_root == merkle_root([e.update_digest for e in kept])
    assert dict(header.contributors) == {e.peer_public_key: int(e.weight) for e in kept}
    second.ledger.close()
