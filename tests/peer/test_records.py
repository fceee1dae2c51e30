"""A peer follows the density the aggregator announces, and refuses one its run config does not allow."""

import asyncio
import dataclasses
from pathlib import Path

import pytest

from potluck.peer.records import Master, Shard, apply_shard_aggregate
from potluck.protocol.dht_schema import AggregatorAnnouncement
from potluck.protocol.envelope import SignedAggregate, sign_aggregate
from potluck.protocol.identity import generate_identity
from potluck.protocol.messages import decode_state_payload
from potluck.training.diloco import OuterOptimizer
from potluck.training.models import model_config, parameter_shapes
from tests.aggregator_server.in_process import AGGREGATOR, closed_round_0, make_server

PEERS = [generate_identity() for _ in range(3)]


async def _round_0_aggregate(tmp_path: Path) -> tuple[Master, SignedAggregate, bytes]:
    """A peer's copy of round 0's master and the aggregate that closes round 0 at fast links (next: 1/2)."""
    server = make_server(tmp_path)
    server.current.opened_at -= 100  # 100 s of compute against uploads read in microseconds
    signed_state, state_payload, aggregate, payload = await closed_round_0(server, PEERS)
    cfg, params, _, _ = decode_state_payload(state_payload)
    outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
    names = tuple(parameter_shapes(model_config(cfg.model.size)))  # the model's order
    announced = AggregatorAnnouncement(
        run_id=cfg.run_name,
        config_hash=cfg.config_hash,
        public_key=AGGREGATOR.public_key,
        libp2p_peer_id=b"\x00\x24" + bytes(36),
        maddrs=(),
        round=0,
        timestamp_s=0.0,
    )
    shard = Shard(
        index=0,
        names=names,
        announcement=announced,
        link=None,  # type: ignore[arg-type]  # applying an aggregate does not talk to the aggregator
        version=0,
        outer=outer,
        density=signed_state.header.density,
    )
    master = Master(
        cfg=cfg,
        round=0,
        params={name: params[name] for name in names},
        shards=[shard],
    )
    return master, aggregate, payload


def _apply(master: Master, signed: SignedAggregate, payload: bytes) -> bool:
    (shard,) = master.shards
    return apply_shard_aggregate(master, shard, signed, payload)


def test_the_peer_takes_up_the_announced_density_for_the_next_round(tmp_path: Path) -> None:
    master, signed, payload = asyncio.run(_round_0_aggregate(tmp_path))

    assert _apply(master, signed, payload)
    assert (master.shards[0].version, master.shards[0].density) == (1, 1 / 2)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_an_aggregate_announcing_a_density_off_the_runs_ladder_sends_the_peer_to_resync(
    tmp_path: Path, density: float, caplog: pytest.LogCaptureFixture
) -> None:
    master, signed, payload = asyncio.run(_round_0_aggregate(tmp_path))
    forged = sign_aggregate(dataclasses.replace(signed.header, next_density=density), AGGREGATOR)  # a trusted key

    assert not _apply(master, forged, payload)
    assert (master.shards[0].version, master.shards[0].density) == (0, 1 / 64)  # nothing applied
    assert f"announces a density {density!r} is not one the run config allows" in caplog.text
