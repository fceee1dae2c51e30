"""DHT schema: the owner-only record validator, the aggregator announcement, and both over two real DHT nodes."""

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

with warnings.catch_warnings():
    # `import hivemind` runs torch.jit.script at import time, which recent torch deprecates with a warning
    # attributed to torch, not hivemind, so pyproject's hivemind filter misses it; it says nothing about us.
    warnings.simplefilter("ignore", DeprecationWarning)
    import hivemind
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time

from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.dht_schema import (
    AGGREGATORS_KEY,
    MAX_MADDRS,
    AggregatorAnnouncement,
    DHTSchemaError,
    Ed25519RecordValidator,
    announcement_subkey,
    parse_announcements,
    sign_announcement,
)
from potluck.protocol.identity import generate_identity

KEY_ID = DHTID.generate(source=AGGREGATORS_KEY).to_bytes()


def _announcement(public_key: bytes, **overrides: object) -> AggregatorAnnouncement:
    values: dict = {
        "run_id": "tiny-run",
        "config_hash": "ab" * 32,
        "public_key": public_key,
        "libp2p_peer_id": b"\x00\x24" + bytes(36),
        "maddrs": ("/ip4/127.0.0.1/tcp/4242/p2p/QmX",),
        "round": 3,
        "timestamp_s": 1_700_000_000.5,
    }
    return AggregatorAnnouncement(**(values | overrides))


def _record(subkey: str, value: bytes, *, key: bytes = KEY_ID, expiration_time: float = 2e9) -> DHTRecord:
    """A record as hivemind builds it: hashed key, msgpack subkey, msgpack value."""
    return DHTRecord(key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration_time)


def _signed_record(identity, **record_args: object) -> DHTRecord:
    subkey, value = sign_announcement(_announcement(identity.public_key), identity)
    record = _record(subkey, value, **record_args)
    return dataclasses.replace(record, value=Ed25519RecordValidator(identity).sign_value(record))


def _as_dht_result(entries: dict) -> ValueWithExpiration:
    return ValueWithExpiration({k: ValueWithExpiration(v, 2e9) for k, v in entries.items()}, 2e9)


# --- the record validator ---


def test_owner_signed_record_validates_and_strips_back_to_the_value() -> None:
    identity = generate_identity()
    record = _signed_record(identity)
    validator = Ed25519RecordValidator()  # a reader: no identity needed to validate
    assert validator.validate(record)
    assert (
        MSGPackSerializer.loads(validator.strip_value(record))
        == sign_announcement(_announcement(identity.public_key), identity)[1]
    )


def test_tampered_value_is_refused() -> None:
    record = _signed_record(generate_identity())
    tampered = bytearray(record.value)
    tampered[5] ^= 1
    assert not Ed25519RecordValidator().validate(dataclasses.replace(record, value=bytes(tampered)))


def test_extended_expiration_is_refused() -> None:
    record = _signed_record(generate_identity())
    assert not Ed25519RecordValidator().validate(
        dataclasses.replace(record, expiration_time=record.expiration_time + 1)
    )


def test_int_expiration_signs_the_same_as_the_double_other_nodes_receive() -> None:
    record = _signed_record(generate_identity(), expiration_time=2_000_000_000)
    assert Ed25519RecordValidator().validate(dataclasses.replace(record, expiration_time=2e9))


def test_record_signed_by_another_key_under_the_owners_subkey_is_refused() -> None:
    owner, forger = generate_identity(), generate_identity()
    subkey, value = sign_announcement(_announcement(forger.public_key), forger)
    record = _record(announcement_subkey(owner.public_key), value)
    # the forger's node cannot sign for the owner's subkey, and re-signing with its own key does not verify
    assert Ed25519RecordValidator(forger).sign_value(record) == record.value
    forged = dataclasses.replace(record, value=record.value + _signed_record(forger).value[-64:])
    assert not Ed25519RecordValidator().validate(record)
    assert not Ed25519RecordValidator().validate(forged)


def test_signed_record_moved_to_another_key_is_refused() -> None:
    record = _signed_record(generate_identity())
    other_key = DHTID.generate(source="potluck/v1/elsewhere").to_bytes()
    assert not Ed25519RecordValidator().validate(dataclasses.replace(record, key=other_key))


def test_missing_signature_and_unmarked_subkeys_under_the_aggregators_key_are_refused() -> None:
    identity = generate_identity()
    subkey, value = sign_announcement(_announcement(identity.public_key), identity)
    validator = Ed25519RecordValidator()
    assert not validator.validate(_record(subkey, value))  # no record signature
    assert not validator.validate(_record("just-a-name", value))  # not owner-marked
    regular = DHTRecord(KEY_ID, MSGPackSerializer.dumps(None), MSGPackSerializer.dumps(value), 2e9)
    assert not validator.validate(regular)  # a plain value would replace the whole dictionary
    sloppy = _record(subkey.upper().replace("[ED25519:", "[ed25519:"), value)  # marked, but not the one spelling
    assert not validator.validate(
        dataclasses.replace(sloppy, value=Ed25519RecordValidator(identity).sign_value(sloppy))
    )


def test_unrelated_records_pass_untouched() -> None:
    validator = Ed25519RecordValidator(generate_identity())
    record = DHTRecord(DHTID.generate(source="hivemind/x").to_bytes(), MSGPackSerializer.dumps(None), b"\x01", 1e9)
    assert validator.validate(record)
    assert validator.sign_value(record) == record.value
    assert validator.strip_value(record) == record.value


def test_merging_validators_keeps_one_identity() -> None:
    identity = generate_identity()
    reader = Ed25519RecordValidator()
    assert reader.merge_with(Ed25519RecordValidator(identity))
    assert reader.validate(_signed_record(identity))
    with pytest.raises(DHTSchemaError, match="pass only one"):
        reader.merge_with(Ed25519RecordValidator(generate_identity()))


@given(
    key=st.binary(max_size=40), subkey=st.binary(max_size=120), value=st.binary(max_size=300), expiration=st.floats()
)
def test_hostile_records_never_raise(key: bytes, subkey: bytes, value: bytes, expiration: float) -> None:
    validator = Ed25519RecordValidator()
    for k, s in ((key, subkey), (KEY_ID, subkey), (key, b"\xd9\x4a[ed25519:" + subkey)):
        assert validator.validate(DHTRecord(k, s, value, expiration)) in (True, False)


def test_non_bytes_record_parts_are_refused() -> None:
    assert not Ed25519RecordValidator().validate(DHTRecord(KEY_ID, None, b"x", 1.0))  # type: ignore[arg-type]


# --- the announcement ---


def test_announcement_round_trips_through_sign_and_parse() -> None:
    identity = generate_identity()
    announcement = _announcement(
        identity.public_key, maddrs=tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(MAX_MADDRS))
    )
    subkey, value = sign_announcement(announcement, identity)
    assert subkey == f"[ed25519:{identity.public_key.hex()}]"
    assert parse_announcements(_as_dht_result({subkey: value})) == [announcement]
    assert parse_announcements(None) == []


def test_signing_for_another_key_is_refused() -> None:
    with pytest.raises(DHTSchemaError, match="public_key=identity.public_key"):
        sign_announcement(_announcement(generate_identity().public_key), generate_identity())


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("run_id", ""),
        ("config_hash", "AB" * 32),
        ("public_key", bytes(31)),
        ("libp2p_peer_id", b""),
        ("maddrs", ("/ip4/1.2.3.4",) * (MAX_MADDRS + 1)),
        ("maddrs", ("x" * 257,)),
        ("round", -1),
        ("round", True),
        ("timestamp_s", float("nan")),
        ("protocol_version", 0),
    ],
    ids=lambda value: str(value)[:20],
)
def test_invalid_fields_are_refused_naming_the_field(field: str, bad: object) -> None:
    with pytest.raises(DHTSchemaError, match=f"AggregatorAnnouncement.{field} must be"):
        _announcement(**({"public_key": bytes(32)} | {field: bad}))


def test_parse_skips_misplaced_tampered_and_garbage_entries() -> None:
    good, other = generate_identity(), generate_identity()
    good_subkey, good_value = sign_announcement(_announcement(good.public_key), good)
    other_subkey, other_value = sign_announcement(_announcement(other.public_key), other)
    entries = {
        good_subkey: good_value,
        announcement_subkey(bytes(32)): other_value,  # someone else's announcement under a different subkey
        other_subkey: other_value.replace(b"tiny-run", b"tiny-rum"),
        "garbage": b"\xc1\xff",
    }
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(parse_announcements.__module__)
    logger.addHandler(handler)
    try:
        assert parse_announcements(_as_dht_result(entries)) == [_announcement(good.public_key)]
    finally:
        logger.removeHandler(handler)
    assert ["another subkey" in warned[0], "does not verify" in warned[1], "not valid msgpack" in warned[2]] == [
        True
    ] * 3


def test_other_protocol_version_is_returned_for_the_caller_to_refuse() -> None:
    identity = generate_identity()
    subkey, value = sign_announcement(
        _announcement(identity.public_key, protocol_version=PROTOCOL_VERSION + 1), identity
    )
    [found] = parse_announcements(_as_dht_result({subkey: value}))
    assert found.protocol_version == PROTOCOL_VERSION + 1


def test_a_field_list_of_a_newer_version_is_skipped_naming_no_install_command() -> None:
    # Prepare: a newer protocol added a field
    identity = generate_identity()
    values = [PROTOCOL_VERSION + 1, "tiny-run", "ab" * 32, identity.public_key, b"\x00", [], 3, 1.5, "new"]
    data = msgpack.packb(["potluck/aggregator-announcement", values, bytes(64)], use_bin_type=True)
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(parse_announcements.__module__)
    logger.addHandler(handler)

    # Execute
    try:
        found = parse_announcements(_as_dht_result({announcement_subkey(identity.public_key): data}))
    finally:
        logger.removeHandler(handler)

    # Assert
    assert found == []
    [line] = warned
    assert line.endswith(
        f"(it claims v{PROTOCOL_VERSION + 1}); if its version is newer, upgrade potluck from where you installed it"
    )
    assert "pip" not in line


@given(data=st.binary(max_size=600))
def test_hostile_announcement_bytes_are_skipped(data: bytes) -> None:
    subkey = announcement_subkey(bytes(32))
    assert parse_announcements(_as_dht_result({subkey: data})) == []


@given(
    values=st.lists(
        st.one_of(
            st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20), st.binary(max_size=40), st.none()
        ),
        max_size=10,
    )
)
def test_hostile_msgpack_field_lists_are_skipped(values: list) -> None:
    data = msgpack.packb(["potluck/aggregator-announcement", values, bytes(64)], use_bin_type=True)
    assert parse_announcements(_as_dht_result({announcement_subkey(bytes(32)): data})) == []


def test_non_dictionary_results_are_skipped() -> None:
    assert parse_announcements(ValueWithExpiration(b"flat", 2e9)) == []


# --- two real DHT nodes ---


def _p2pd_children() -> list[int]:
    """PIDs of this process's descendants (the DHT runs in a forked child) whose command line mentions p2pd."""
    parents: dict[int, int] = {}
    p2pd = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"p2pd" in (proc / "cmdline").read_bytes():
                p2pd.add(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    found = []
    for pid in p2pd:
        ancestor = parents.get(pid)
        while ancestor and ancestor != os.getpid():
            ancestor = parents.get(ancestor)
        if ancestor == os.getpid():
            found.append(pid)
    return found


def _wait_for(condition, *, timeout_s: float = 20) -> bool:
    """Poll `condition` until it is true or `timeout_s` passes (DHT stores settle asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.network
@pytest.mark.timeout(60)
def test_only_the_owner_can_announce_over_two_real_dht_nodes() -> None:
    owner, forger = generate_identity(), generate_identity()
    started: list[hivemind.DHT] = []
    try:
        first = hivemind.DHT(
            start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[Ed25519RecordValidator(owner)]
        )
        started.append(first)
        second = hivemind.DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=[str(m) for m in first.get_visible_maddrs()],
            record_validators=[Ed25519RecordValidator(forger)],
        )
        started.append(second)

        announcement = _announcement(owner.public_key, libp2p_peer_id=first.peer_id.to_bytes())
        subkey, value = sign_announcement(announcement, owner)
        expiration = get_dht_time() + 30
        assert first.store(AGGREGATORS_KEY, value, expiration, subkey=subkey)
        assert _wait_for(lambda: parse_announcements(second.get(AGGREGATORS_KEY, latest=True)) == [announcement])

        # the forger signs a newer announcement of its own and stores it under the owner's subkey
        fake = _announcement(forger.public_key, round=99)
        _, fake_value = sign_announcement(fake, forger)
        assert not second.store(AGGREGATORS_KEY, fake_value, expiration + 10, subkey=subkey)
        for dht in started:
            assert parse_announcements(dht.get(AGGREGATORS_KEY, latest=True)) == [announcement]
    finally:
        for dht in started:
            dht.shutdown()
    assert _wait_for(lambda: not _p2pd_children(), timeout_s=10), f"p2pd left running: {_p2pd_children()}"
