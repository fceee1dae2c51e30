"""Tests for potluck.aggregator_server.master: closing a round on the master state, as peers will replay it."""

import hashlib

import pytest
import torch

from potluck.aggregator_server.master import Contribution, MasterState, close_round, initial_master, token_cap
from potluck.incentives.merkle import merkle_root
from potluck.protocol.codecs import Codec, make_codec
from potluck.protocol.config import RunConfig
from potluck.protocol.identity import generate_identity
from potluck.training.diloco import OuterOptimizer, state_sha256

CFG = RunConfig(run_name="master-test", model={"size": "tiny", "block_size": 32}, local_steps=4, rounds=10)
AGGREGATOR = generate_identity()
PEERS = [generate_identity() for _ in range(3)]
MASTER = initial_master(CFG)


def _codec(cfg: RunConfig = CFG) -> Codec:
    return make_codec(cfg.aggregate_codec.name, cfg.aggregate_codec.params)


def _delta(seed: int, master: MasterState = MASTER) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.01 * torch.randn(shape, generator=generator) for name, shape in master.spec.items()}


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"update %d" % i).digest()


def _contributions(master: MasterState = MASTER) -> list[Contribution]:
    return [
        Contribution(
            public_key=peer.public_key, decoded=_delta(i, master), tokens=1_000 * (i + 1), update_digest=_digest(i)
        )
        for i, peer in enumerate(PEERS)
    ]


def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in tensors.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def _after_one_round() -> MasterState:
    """A master with outer momentum and an aggregator residual, so nothing it holds is empty."""
    following, _, _ = close_round(MASTER, _contributions(), cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec())
    assert following.outer_state and following.residual
    return following


def test_close_round_leaves_the_input_state_unchanged() -> None:
    # Prepare
    master = _after_one_round()
    params, outer, residual = _copy(master.params), _copy(master.outer_state), _copy(master.residual)
    # Execute
    following, _, _ = close_round(
        master, _contributions(master), cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec()
    )
    # Assert
    assert (master.round, master.version) == (1, 1)
    assert _same(master.params, params)
    assert _same(master.outer_state, outer)
    assert _same(master.residual, residual)
    assert not _same(following.params, params)
    assert not _same(following.residual, residual)


def test_close_round_advances_round_and_version_and_signs_a_verifiable_aggregate() -> None:
    # Execute
    following, signed, payload = close_round(
        MASTER, _contributions(), cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec()
    )
    # Assert
    assert (following.round, following.version) == (MASTER.round + 1, MASTER.version + 1)
    signed.verify({AGGREGATOR.public_key})
    signed.verify_payload(payload)
    header = signed.header
    assert (header.round, header.new_version) == (MASTER.round, MASTER.version + 1)
    assert (header.run_id, header.config_hash) == (CFG.run_name, CFG.config_hash)
    assert header.codec == CFG.aggregate_codec.name
    assert header.aggregator_public_key == AGGREGATOR.public_key
    assert header.state_sha256 == state_sha256(following.params)
    assert following.spec == MASTER.spec


def test_a_peer_applying_the_aggregate_reaches_the_same_state_bit_for_bit() -> None:
    # Prepare: the master a peer downloaded, momentum included
    master = _after_one_round()
    following, signed, payload = close_round(
        master, _contributions(master), cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec()
    )
    peer_params = _copy(master.params)
    peer_outer = OuterOptimizer(kind=CFG.outer.kind, lr=CFG.outer.lr, momentum=CFG.outer.momentum)
    peer_outer.load_state_dict(master.outer_state)
    # Execute: what a peer does with the aggregate it downloads
    peer_outer.step(peer_params, _codec().decode(payload, master.spec))
    # Assert
    assert _same(peer_params, following.params)
    assert state_sha256(peer_params) == signed.header.state_sha256
    assert _same(peer_outer.state_dict(), following.outer_state)


def test_the_header_credits_each_contributor_its_tokens() -> None:
    contributions = _contributions()

    _, signed, _ = close_round(MASTER, contributions, cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec())

    assert dict(signed.header.contributors) == {c.public_key: c.tokens for c in contributions}


def test_updates_are_weighted_by_tokens() -> None:
    # Prepare: exact download codec and plain averaging, so the new params are old minus the weighted mean
    cfg = CFG.with_overrides({"aggregate_codec": {"name": "none"}, "outer.kind": "average"})
    ones = {name: torch.ones(shape) for name, shape in MASTER.spec.items()}
    fives = {name: torch.full(shape, 5.0) for name, shape in MASTER.spec.items()}
    contributions = [
        Contribution(public_key=PEERS[0].public_key, decoded=ones, tokens=3_000, update_digest=_digest(0)),
        Contribution(public_key=PEERS[1].public_key, decoded=fives, tokens=1_000, update_digest=_digest(1)),
    ]
    # Execute
    following, _, _ = close_round(MASTER, contributions, cfg=cfg, identity=AGGREGATOR, aggregate_codec=_codec(cfg))
    # Assert: (3 * 1 + 1 * 5) / 4 = 2
    for name, old in MASTER.params.items():
        torch.testing.assert_close(following.params[name], old - 2.0, rtol=0, atol=1e-6)


def test_the_result_does_not_depend_on_the_order_contributions_arrive_in() -> None:
    contributions = _contributions()

    first, _, first_payload = close_round(
        MASTER, contributions, cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec()
    )
    second, _, second_payload = close_round(
        MASTER, contributions[::-1], cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec()
    )

    assert first_payload == second_payload
    assert _same(first.params, second.params)


def test_a_round_without_contributions_is_refused() -> None:
    with pytest.raises(ValueError, match="round 0 has no contribution to aggregate"):
        close_round(MASTER, [], cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec())


@pytest.mark.parametrize(("block_size", "expected_block"), [(32, 32), (None, 64)])  # tiny's own default is 64
def test_token_cap_is_one_peers_tokens_per_round(block_size: int | None, expected_block: int) -> None:
    cfg = RunConfig(model={"size": "tiny", "block_size": block_size}, local_steps=7, inner={"batch_size": 3})

    assert token_cap(cfg) == 7 * 3 * expected_block


def test_the_aggregate_commits_to_its_updates_and_the_ledger_head() -> None:
    # Prepare
    head = hashlib.sha256(b"ledger head").digest()
    # Execute
    _, signed, _ = close_round(
        MASTER, _contributions(), cfg=CFG, identity=AGGREGATOR, aggregate_codec=_codec(), ledger_head=head
    )
    # Assert
    assert signed.header.updates_root == merkle_root([_digest(i) for i in range(len(PEERS))])
    assert signed.header.ledger_head == head
