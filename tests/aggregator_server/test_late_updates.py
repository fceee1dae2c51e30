"""Late updates (RunConfig.late_updates): an update for round r that arrives while round r+1 is open is taken
into round r+1 at the run's discount, in place of its peer's own round-r+1 update, or refused. In process,
through the real submit handler; no network."""

import asyncio
from pathlib import Path

import pytest

from potluck.protocol.envelope import MAX_AGGREGATE_ENVELOPE_BYTES, SignedAggregate, SignedState, SignedUpdate
from potluck.protocol.identity import Identity, generate_identity
from potluck.protocol.messages import unpack_envelope
from tests.aggregator_server.in_process import aggregate_body
from tests.aggregator_server.in_process import make_server as _server
from tests.aggregator_server.in_process import state as _state
from tests.aggregator_server.in_process import submit as _submit
from tests.integration.swarm_helpers import signed_test_update

EARLY, LATE = generate_identity(), generate_identity()
TOKENS = 4_000


def _update(state: tuple[SignedState, bytes], sender: Identity, seed: int) -> tuple[SignedUpdate, bytes]:
    return signed_test_update(*state, sender=sender, tokens=TOKENS, seed=seed)


def test_a_late_update_counts_in_the_next_round_at_the_discount_and_holds_its_peers_place(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = _server(tmp_path, late_updates="discount", late_discount=0.5)
        round_0 = await _state(server)
        late, late_payload = _update(round_0, LATE, seed=1)
        assert (await _submit(server, *_update(round_0, EARLY, seed=0))).receipt.accepted
        await server.close("deadline")  # round 0 closes without LATE's update
        # Execute: round 0's update arrives in round 1, then LATE's own round-1 update, then the late one again
        taken = (await _submit(server, late, late_payload)).receipt
        own = (await _submit(server, *_update(await _state(server), LATE, seed=2))).receipt
        again = (await _submit(server, late, late_payload)).receipt  # a retry after a lost reply
        assert (await _submit(server, *_update(await _state(server), EARLY, seed=3))).receipt.accepted
        await server.close("deadline")
        # Assert
        assert taken.accepted and taken.round == 1 and taken.tokens_credited == TOKENS // 2
        assert not own.accepted and "counts in round 1" in own.reason
        assert again.accepted and again.tokens_credited == TOKENS // 2
        assert server.reputation.strikes.get(LATE.public_key, []) == []  # being slow is no offence
        envelope, _ = unpack_envelope(aggregate_body(server, 1), max_envelope_bytes=MAX_AGGREGATE_ENVELOPE_BYTES)
        credited = dict(SignedAggregate.from_bytes(envelope).header.contributors)
        assert credited == {EARLY.public_key: TOKENS, LATE.public_key: TOKENS // 2}
        late_row = next(r for r in server.ledger.rows(round_index=1) if r.entry.peer_public_key == LATE.public_key)
        assert late_row.entry.update_digest == late.header.digest() and late_row.entry.weight == TOKENS // 2
        server.ledger.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("policy", ["reject", "discount"])
def test_an_update_is_refused_when_the_run_rejects_late_ones_or_it_is_two_rounds_late(
    tmp_path: Path, policy: str
) -> None:
    async def scenario() -> None:
        server = _server(tmp_path, late_updates=policy)
        round_0 = await _state(server)
        assert (await _submit(server, *_update(round_0, EARLY, seed=0))).receipt.accepted
        await server.close("deadline")
        if policy == "discount":  # one more round: round 0's update is now two rounds late
            assert (await _submit(server, *_update(await _state(server), EARLY, seed=1))).receipt.accepted
            await server.close("deadline")

        refused = (await _submit(server, *_update(round_0, LATE, seed=2))).receipt

        assert not refused.accepted and refused.reason.startswith("round:"), refused.reason
        assert LATE.public_key not in server.current.accepted
        server.ledger.close()

    asyncio.run(scenario())
