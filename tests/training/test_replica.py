"""A copy of a shard's master state (a peer's, a standby's) takes only what its aggregator signed."""

import asyncio
import dataclasses
from pathlib import Path

import pytest

from potluck.protocol.envelope import SignedAggregate
from potluck.protocol.identity import generate_identity, public_key_to_hex
from potluck.protocol.messages import encode_state_payload
from potluck.tasks import run_shapes
from potluck.training.diloco import state_sha256
from potluck.training.replica import ReplicaError, ShardState, apply_aggregate, check_state
from tests.aggregator_server.in_process import AGGREGATOR, closed_round_0, make_server

PEERS = [generate_identity() for _ in range(3)]


async def _round_0(tmp_path: Path):  # noqa: ANN202
    """Round 0's signed state, and the aggregate that closed it with three peers' updates."""
    server = make_server(tmp_path, aggregator_keys=[public_key_to_hex(AGGREGATOR.public_key)])
    return *await closed_round_0(server, PEERS), server.master


def _apply(copy: ShardState, aggregate: SignedAggregate, payload: bytes) -> None:
    apply_aggregate(
        aggregate,
        payload,
        cfg=copy.cfg,
        source=AGGREGATOR.public_key,
        round_index=0,
        density=copy.header.density,
        params=copy.params,
        outer=copy.outer,
    )


def test_a_copy_follows_the_aggregate_to_the_aggregators_exact_state(tmp_path: Path) -> None:
    signed_state, state_payload, aggregate, payload, after = asyncio.run(_round_0(tmp_path))
    copy = check_state(signed_state, state_payload, source=AGGREGATOR.public_key, shapes_of=run_shapes)

    _apply(copy, aggregate, payload)

    assert (copy.shard, copy.header.round) == (0, 0)
    assert state_sha256(copy.params) == state_sha256(after.params) == aggregate.header.state_sha256


def test_a_copy_rebuilds_the_aggregators_state_payload_byte_for_byte(tmp_path: Path) -> None:
    # Peers serve chunks of the state they hold: only a byte-exact rebuild matches the aggregator's manifest.
    async def scenario():  # noqa: ANN202
        server = make_server(tmp_path, aggregator_keys=[public_key_to_hex(AGGREGATOR.public_key)])
        signed_state, state_payload, aggregate, payload = await closed_round_0(server, PEERS)
        return signed_state, state_payload, aggregate, payload, await server.served_state()

    signed_state, state_payload, aggregate, payload, served = asyncio.run(scenario())
    copy = check_state(signed_state, state_payload, source=AGGREGATOR.public_key, shapes_of=run_shapes)
    _apply(copy, aggregate, payload)

    rebuilt = encode_state_payload(copy.cfg, params=copy.params, outer_state=copy.outer.state_dict())

    assert served.version == 1 and copy.outer.state_dict()  # after a step: momentum is part of the payload
    assert rebuilt == served.payload


def test_a_state_from_another_key_or_with_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    signed_state, state_payload, *_ = asyncio.run(_round_0(tmp_path))
    flipped = bytearray(state_payload)
    flipped[-1] ^= 1

    with pytest.raises(ReplicaError, match="does not check out"):
        check_state(signed_state, state_payload, source=generate_identity().public_key, shapes_of=run_shapes)
    with pytest.raises(ReplicaError, match="does not check out"):
        check_state(signed_state, bytes(flipped), source=AGGREGATOR.public_key, shapes_of=run_shapes)


@pytest.mark.parametrize("problem", ["source", "round"])
def test_an_aggregate_that_is_not_the_expected_one_leaves_the_copy_untouched(tmp_path: Path, problem: str) -> None:
    signed_state, state_payload, aggregate, payload, _ = asyncio.run(_round_0(tmp_path))
    copy = check_state(signed_state, state_payload, source=AGGREGATOR.public_key, shapes_of=run_shapes)
    before = state_sha256(copy.params)
    source = generate_identity().public_key if problem == "source" else AGGREGATOR.public_key
    if problem == "round":
        aggregate = dataclasses.replace(aggregate, header=dataclasses.replace(aggregate.header, round=1))

    with pytest.raises(ReplicaError, match="aggregate refused"):
        apply_aggregate(
            aggregate,
            payload,
            cfg=copy.cfg,
            source=source,
            round_index=0,
            density=copy.header.density,
            params=copy.params,
            outer=copy.outer,
        )

    assert state_sha256(copy.params) == before
