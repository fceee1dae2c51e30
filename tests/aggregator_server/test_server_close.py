"""The server's close: the keeper closes the round in a worker thread, its events reach the event loop's thread,
and a failed checkpoint leaves the round recorded but open, closed as recorded on the next try. In process."""

import asyncio
import threading
from pathlib import Path

import pytest

from potluck.aggregator_server import closing
from potluck.aggregator_server.checkpoint import CheckpointError
from potluck.events import Event, RoundClosed, RoundError
from potluck.protocol.identity import generate_identity
from tests.aggregator_server.in_process import make_server, state, submit
from tests.integration.swarm_helpers import signed_test_update

PEERS = [generate_identity() for _ in range(2)]


def _full_disk(*_: object) -> None:
    raise CheckpointError("no space left on the state dir")


def test_a_failed_checkpoint_is_reported_on_the_loop_thread_and_the_retry_closes_the_round_as_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> list[tuple[Event, bool]]:
        # Prepare: two accepted updates; the first checkpoint of the close fails
        seen: list[tuple[Event, bool]] = []
        loop_thread = threading.get_ident()
        server = make_server(tmp_path)
        server.on_event = lambda event: seen.append((event, threading.get_ident() == loop_thread))
        for seed, peer in enumerate(PEERS):
            update = signed_test_update(*await state(server), sender=peer, tokens=4_000, seed=seed)
            assert (await submit(server, *update)).receipt.accepted
        monkeypatch.setattr(closing, "RETRY_S", 0.0)
        save = server.keeper.checkpoint
        server.keeper.checkpoint = _full_disk  # type: ignore[method-assign]
        # Execute
        await server.close("all-reported")
        still_open = (server.master.round, [h.round for h in server.ledger.heads()])
        server.keeper.checkpoint = save  # type: ignore[method-assign]
        await server.close("all-reported")
        # Assert
        assert still_open == (0, [0])  # recorded in the ledger, not checkpointed: nothing published
        assert server.master.round == 1 and [h.round for h in server.ledger.heads()] == [0]
        server.ledger.close()
        return seen

    seen = asyncio.run(scenario())

    errors = [(e, on_loop) for e, on_loop in seen if isinstance(e, RoundError)]
    closed = [e for e, _ in seen if isinstance(e, RoundClosed)]
    assert len(errors) == 1 and errors[0][1] and "no space left" in errors[0][0].detail
    assert all(on_loop for _, on_loop in seen)  # the keeper's events too, though it closed in a worker thread
    assert len(closed) == 1 and closed[0].round == 0 and len(closed[0].accepted) == 2
