"""Adaptive density through the real handlers: the aggregator times a round's uploads, announces the next
round's density in its signed aggregate and state, and decodes that round's uploads at it and no other."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from potluck.aggregator_server.server import AggregatorServer
from potluck.events import Event, RoundClosed
from potluck.protocol.envelope import MAX_AGGREGATE_ENVELOPE_BYTES, SignedAggregate, SignedReceipt
from potluck.protocol.identity import Identity, generate_identity
from potluck.protocol.messages import unpack_envelope
from tests.aggregator_server.in_process import aggregate_body, make_server, state, submit
from tests.integration.swarm_helpers import signed_test_update

PEERS = [generate_identity() for _ in range(3)]
TOKENS = 4_000


async def _upload(
    server: AggregatorServer, peer: Identity, *, seed: int = 0, density: float | None = None
) -> SignedReceipt:
    """`peer`'s update for the open round (at the announced density unless given one)."""
    update = signed_test_update(*await state(server), sender=peer, tokens=TOKENS, seed=seed, density=density)
    return await submit(server, *update)


async def _round_0(tmp_path: Path, **overrides: Any) -> tuple[AggregatorServer, SignedAggregate, list[Event]]:
    """Round 0 with three peers that computed for 100 s (read in microseconds: a link far faster than needed)."""
    events: list[Event] = []
    server = make_server(tmp_path, **overrides)
    server.on_event = events.append
    server.current.opened_at -= 100  # the uploads arrive 100 s into the round
    for seed, peer in enumerate(PEERS):
        assert (await _upload(server, peer, seed=seed)).receipt.accepted
    await server.close("all-reported")
    envelope, _ = unpack_envelope(aggregate_body(server, 0), max_envelope_bytes=MAX_AGGREGATE_ENVELOPE_BYTES)
    return server, SignedAggregate.from_bytes(envelope), events


def test_fast_links_raise_the_next_rounds_density_which_the_aggregate_and_the_state_announce(tmp_path: Path) -> None:
    async def scenario() -> None:
        server, aggregate, events = await _round_0(tmp_path)

        closed = next(e for e in events if isinstance(e, RoundClosed))
        assert (closed.density, closed.next_density) == (1 / 64, 1 / 2)
        assert aggregate.header.next_density == (await state(server))[0].header.density == 1 / 2
        # round 1 decodes its uploads at 1/2 only: one still at 1/64 is refused, saying why
        stale = (await _upload(server, PEERS[0], density=1 / 64)).receipt
        fresh = (await _upload(server, PEERS[1])).receipt
        assert not stale.accepted and stale.reason.startswith("decode:")
        assert "'density': 0.015625" in stale.reason and "'density': 0.5" in stale.reason
        assert fresh.accepted
        server.ledger.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("max_density", [None, 1 / 64])
def test_a_run_that_does_not_adapt_keeps_its_codecs_density(tmp_path: Path, max_density: float | None) -> None:
    async def scenario() -> None:
        server, aggregate, _ = await _round_0(tmp_path, max_density=max_density)

        assert aggregate.header.next_density == (await state(server))[0].header.density == 1 / 64
        server.ledger.close()

    asyncio.run(scenario())


def test_a_restarted_aggregator_resumes_at_the_density_it_announced(tmp_path: Path) -> None:
    async def scenario() -> None:
        server, _, _ = await _round_0(tmp_path)
        server.ledger.close()

        restarted = make_server(tmp_path)

        assert restarted.master.density == (await state(restarted))[0].header.density == 1 / 2
        assert restarted.codec.params["density"] == 1 / 2 and restarted.aggregate_codec.params["density"] == 1.0
        restarted.ledger.close()

    asyncio.run(scenario())
