"""The trust root: a joiner trusts the run's keys from --aggregator-key, the --join aggregator or its pin, and no
stranger's DHT record (announcement or ban list) changes whom it trusts, whatever the stranger claims."""

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from potluck.aggregator_server.announcer import Announcer
from potluck.cli.common import UsageError
from potluck.cli.peer_flags import PeerFlags
from potluck.peer import sync as sync_module
from potluck.peer.options import PeerOptions
from potluck.peer.records import HeldOutScore, Tally
from potluck.peer.sync import Sync
from potluck.peer.trust import TrustError, choose_root, joined_key, pin_file, read_pin, write_pin
from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.ban_records import BANS_KEY, BanList, parse_ban_lists, sign_ban_list
from potluck.protocol.client import AggregatorUnreachable
from potluck.protocol.dht_schema import AggregatorAnnouncement
from potluck.protocol.envelope import SignedState, StateHeader, sign_state
from potluck.protocol.identity import Identity, generate_identity, public_key_to_hex
from tests.peer.test_discovery import RUN, announcement
from tests.peer.test_sync import _DHT

REAL, STANDBY, STRANGER = (generate_identity() for _ in range(3))
REAL_NODE = b"\x00\x24" + bytes(36)
HONEST_PEER = generate_identity().public_key
LATER = 1_700_000_100.0  # strangers announce after the real aggregator: a newest-first choice would pick them


def _hex(*identities: Identity) -> tuple[str, ...]:
    return tuple(public_key_to_hex(i.public_key) for i in identities)


def _state(signer: Identity, *, run: str = RUN) -> SignedState:
    header = StateHeader(
        run_id=run,
        config_hash="ab" * 32,
        round=3,
        new_version=3,
        aggregator_public_key=signer.public_key,
        shard=0,
        payload_bytes=10,
        payload_sha256=bytes(32),
        chunk_bytes=1 << 20,
        chunks_sha256=bytes(32),
        state_sha256=bytes(32),
        timestamp_s=1.0,
    )
    return sign_state(header, signer)


def _strangers() -> list[tuple[AggregatorAnnouncement, Identity]]:
    """A stranger's announcements: another version, another run, the run under its own key, the real node."""
    others = [generate_identity() for _ in range(3)]
    return [
        (announcement(others[0], protocol_version=PROTOCOL_VERSION + 1, timestamp_s=LATER), others[0]),
        (announcement(others[1], run_id="other-run", timestamp_s=LATER), others[1]),
        (announcement(others[2], timestamp_s=LATER), others[2]),
        (announcement(STRANGER, libp2p_peer_id=REAL_NODE, timestamp_s=LATER), STRANGER),
    ]


REAL_ONE = announcement(REAL, libp2p_peer_id=REAL_NODE)


# ----------------------------------------------------------------- what the --join node proves


def test_the_join_node_proves_the_key_whose_state_it_serves_and_whose_announcement_names_it() -> None:
    found = [REAL_ONE, *(a for a, _ in _strangers())]

    assert joined_key(_state(REAL), REAL_NODE, found, run=None) == REAL.public_key


@pytest.mark.parametrize(
    ("why", "state", "node", "run"),
    [
        ("a node relaying the aggregator's state", lambda: _state(REAL), b"\x00\x24relay" + bytes(31), None),
        ("a stranger claiming the real node", lambda: _state(STRANGER), REAL_NODE, None),
        ("another run than --run", lambda: _state(REAL), REAL_NODE, "not-this-one"),
    ],
)
def test_a_join_node_that_is_not_the_announced_aggregator_proves_nothing(why, state, node, run) -> None:  # noqa: ANN001
    # Prepare: the stranger's announcement names the real node under the stranger's key
    found = [REAL_ONE, announcement(STRANGER, libp2p_peer_id=b"\x00\x24" + STRANGER.public_key + bytes(4))]

    with pytest.raises(AggregatorUnreachable):
        joined_key(state(), node, found, run=run)


def test_a_state_whose_signature_does_not_verify_proves_nothing() -> None:
    signed = _state(REAL)
    forged = dataclasses.replace(signed, signature=bytes(64))

    with pytest.raises(AggregatorUnreachable, match="does not verify"):
        joined_key(forged, REAL_NODE, [REAL_ONE], run=None)


# ----------------------------------------------------------------- which keys are trusted


def test_keys_given_on_the_command_line_win_over_the_join_node_and_the_pin() -> None:
    root = choose_root(
        flag_keys=_hex(STANDBY),
        proven=(REAL.public_key, RUN),
        pinned=(RUN, frozenset({REAL.public_key})),
        run=None,
        pin_path=None,
    )

    assert root is not None and root.keys == {STANDBY.public_key} and root.source == "--aggregator-key"


def test_a_pin_of_the_run_refutes_a_join_aggregator_it_does_not_list(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="not one of the keys pinned .* delete that file or pass --aggregator-key"):
        choose_root(
            flag_keys=(),
            proven=(STRANGER.public_key, RUN),
            pinned=(RUN, frozenset({REAL.public_key})),
            run=None,
            pin_path=tmp_path / "x",
        )


def test_a_join_aggregator_of_another_run_than_the_pinned_one_is_trusted() -> None:
    pinned = (RUN, frozenset({REAL.public_key}))

    root = choose_root(flag_keys=(), proven=(STANDBY.public_key, "next-run"), pinned=pinned, run=None, pin_path=None)

    assert root is not None and root.keys == {STANDBY.public_key}


@pytest.mark.parametrize(("run", "trusted"), [(None, True), (RUN, True), ("next-run", False)])
def test_without_a_proof_the_pin_of_the_run_is_trusted_and_nothing_else(run: str | None, trusted: bool) -> None:
    root = choose_root(flag_keys=(), proven=None, pinned=(RUN, frozenset({REAL.public_key})), run=run, pin_path=None)

    assert (root is not None and root.keys == {REAL.public_key}) is trusted
    assert choose_root(flag_keys=(), proven=None, pinned=None, run=run, pin_path=None) is None


def test_the_pin_sits_beside_the_identity_and_reads_back(tmp_path: Path) -> None:
    path = pin_file(tmp_path / "identity.key")

    write_pin(path, RUN, _hex(REAL, STANDBY))

    assert path == tmp_path / "identity.trusted-aggregators.json"
    assert read_pin(path) == (RUN, frozenset({REAL.public_key, STANDBY.public_key}))
    assert read_pin(tmp_path / "none.json") is None


@pytest.mark.parametrize("body", ["{", json.dumps({"run": RUN, "aggregator_keys": ["zz"]}), "[]"])
def test_a_damaged_pin_is_one_line_that_says_how_to_reset_it(tmp_path: Path, body: str) -> None:
    path = tmp_path / "identity.trusted-aggregators.json"
    path.write_text(body)

    with pytest.raises(TrustError, match="delete it to pin again") as error:
        read_pin(path)

    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["zz", "ab" * 31, "0x" + "ab" * 32])
def test_a_malformed_aggregator_key_flag_is_one_line(value: str) -> None:
    with pytest.raises(UsageError, match="--aggregator-key .*64 hex characters") as error:
        PeerFlags.parsed({"aggregator_key": (value,)})

    assert "\n" not in str(error.value)


def test_an_aggregator_key_flag_is_taken_in_either_case() -> None:
    flags = PeerFlags.parsed({"aggregator_key": (public_key_to_hex(REAL.public_key).upper(),)})

    assert flags.aggregator_key == _hex(REAL)


# ----------------------------------------------------------------- a joiner among strangers


def _joiner(
    monkeypatch: pytest.MonkeyPatch, *, proven: tuple[bytes, str] | None, tmp_path: Path, **options: object
) -> Sync:
    """A joiner whose --join node proves `proven` (None: it proves nothing) on a DHT full of strangers."""

    async def root_from_join(*_: object, **__: object) -> tuple[bytes, str]:
        if proven is None:
            raise AggregatorUnreachable("no --join node proved it is an aggregator")
        return proven

    monkeypatch.setattr(sync_module, "root_from_join", root_from_join)
    sync = Sync(
        SimpleNamespace(dht=_DHT([(REAL_ONE, REAL), *_strangers()]), p2p=None),  # type: ignore[arg-type]
        generate_identity(),
        PeerOptions(join=(), trust_file=tmp_path / "identity.trusted-aggregators.json", **options),  # type: ignore[arg-type]
        join_addrs=[],
        tally=Tally(),
        score=HeldOutScore(0),
        on_event=lambda _: None,
    )

    async def connect(chosen: AggregatorAnnouncement) -> bytes:
        return chosen.libp2p_peer_id

    sync.connect = connect  # type: ignore[method-assign,assignment]  # no libp2p here
    return sync


@pytest.mark.parametrize("how", ["join", "flag", "pin"])
def test_a_joiner_with_a_trust_root_takes_the_real_aggregator_among_strangers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    # Prepare: a restart through a node that is no aggregator finds the pin of its first join
    if how == "pin":
        write_pin(tmp_path / "identity.trusted-aggregators.json", RUN, _hex(REAL))
    proven = (REAL.public_key, RUN) if how == "join" else None
    keys = _hex(REAL) if how == "flag" else ()
    sync = _joiner(monkeypatch, proven=proven, tmp_path=tmp_path, aggregator_keys=keys)

    # Execute
    asyncio.run(sync.find_aggregator())

    # Assert
    assert sync.announcement == REAL_ONE


def test_a_joiner_without_a_trust_root_trusts_no_announcement(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sync = _joiner(monkeypatch, proven=None, tmp_path=tmp_path)

    with pytest.raises(AggregatorUnreachable, match="no --join node proved"):
        asyncio.run(sync.find_aggregator())

    assert sync.announcement is None


def test_a_stranger_that_claims_the_runs_newer_protocol_is_no_upgrade_demand(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: the real aggregator is gone; only the strangers' records are left
    sync = _joiner(monkeypatch, proven=(REAL.public_key, RUN), tmp_path=tmp_path)
    sync.node.dht = _DHT(_strangers())

    with pytest.raises(AggregatorUnreachable) as error:
        asyncio.run(sync.find_aggregator())

    assert "upgrade" not in str(error.value) and "trusts only the --join aggregator" in str(error.value)


# ----------------------------------------------------------------- a stranger's ban list


def test_a_strangers_ban_list_naming_an_honest_peer_is_skipped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a list for the run's own config hash, properly signed by a key that is not the run's
    subkey, value = sign_ban_list(
        BanList(issuer=STRANGER.public_key, config_hash="ab" * 32, bans=((HONEST_PEER, "cheat"),), timestamp_s=1.0),
        STRANGER,
    )
    found = SimpleNamespace(value={subkey: SimpleNamespace(value=value)})

    # Execute
    with caplog.at_level(logging.INFO, logger="potluck.protocol.ban_records"):
        lists = parse_ban_lists(found, config_hash="ab" * 32, trusted=frozenset({REAL.public_key}))

    # Assert: nothing applied, and nothing a flood of strangers could fill a log with
    assert lists == []
    assert caplog.records == []


def test_an_aggregator_applies_its_fellow_aggregators_ban_lists_and_no_strangers() -> None:
    # Prepare: a run of two aggregators; the DHT holds the other one's list and a stranger's naming an honest peer
    cheater = generate_identity().public_key
    lists = [(STANDBY, cheater), (STRANGER, HONEST_PEER)]
    entries = {}
    for issuer, banned in lists:
        ban_list = BanList(issuer=issuer.public_key, config_hash="ab" * 32, bans=((banned, "x"),), timestamp_s=1.0)
        subkey, value = sign_ban_list(ban_list, issuer)
        entries[subkey] = SimpleNamespace(value=value)

    class _BanDHT:
        async def get(self, key: str, *, latest: bool) -> SimpleNamespace:
            assert key == BANS_KEY and latest
            return SimpleNamespace(value=entries)

    banned: list[bytes] = []

    async def ban(key: bytes, reason: str, issuer: bytes) -> None:
        banned.append(key)

    announcer = Announcer(
        SimpleNamespace(config_hash="ab" * 32, aggregator_keys=_hex(REAL, STANDBY)),  # type: ignore[arg-type]
        REAL,
        reputation=SimpleNamespace(bans={}, is_banned=lambda _: False),  # type: ignore[arg-type]
        ban=ban,
        every_s=10.0,
    )

    # Execute
    asyncio.run(announcer.share_bans(SimpleNamespace(dht=_BanDHT())))  # type: ignore[arg-type]

    # Assert
    assert banned == [cheater]
