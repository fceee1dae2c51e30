"""Tests for potluck.protocol.envelope: validation, canonical bytes, signatures, hostile input."""

import dataclasses
import hashlib
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.envelope import (
    MAX_CONTRIBUTORS,
    MAX_MERKLE_PROOF_BYTES,
    AggregateHeader,
    EnvelopeError,
    Receipt,
    SignedAggregate,
    SignedReceipt,
    SignedState,
    SignedUpdate,
    StateHeader,
    UpdateHeader,
    new_nonce,
    payload_digest,
    sign_aggregate,
    sign_receipt,
    sign_state,
    sign_update,
)
from potluck.protocol.identity import generate_identity, verify_signature

PEER = generate_identity()
AGGREGATOR = generate_identity()
PAYLOAD = b"pseudo-gradient bytes " * 10
CONFIG_HASH = hashlib.sha256(b"run config").hexdigest()
HYPOTHESIS = settings(max_examples=200, deadline=None)


def _update_header(**changes: Any) -> UpdateHeader:
    values: dict[str, Any] = dict(
        run_id="tiny-stdlib",
        config_hash=CONFIG_HASH,
        round=7,
        base_version=7,
        peer_public_key=PEER.public_key,
        tokens=65_536,
        inner_steps=500,
        codec="dct-topk",
        payload_bytes=len(PAYLOAD),
        payload_sha256=payload_digest(PAYLOAD),
        nonce=bytes(range(16)),
        timestamp_s=1_700_000_000.25,
    )
    return UpdateHeader(**(values | changes))


def _aggregate_header(**changes: Any) -> AggregateHeader:
    values: dict[str, Any] = dict(
        run_id="tiny-stdlib",
        config_hash=CONFIG_HASH,
        round=7,
        new_version=8,
        aggregator_public_key=AGGREGATOR.public_key,
        codec="dct-topk",
        payload_bytes=len(PAYLOAD),
        payload_sha256=payload_digest(PAYLOAD),
        state_sha256=hashlib.sha256(b"master state").digest(),
        contributors=((PEER.public_key, 65_536), (b"\x07" * 32, 1_000)),
        timestamp_s=1_700_000_060.5,
        updates_root=hashlib.sha256(b"updates root").digest(),
        ledger_head=hashlib.sha256(b"ledger head").digest(),
    )
    return AggregateHeader(**(values | changes))


def _receipt(**changes: Any) -> Receipt:
    values: dict[str, Any] = dict(
        run_id="tiny-stdlib",
        config_hash=CONFIG_HASH,
        round=7,
        peer_public_key=PEER.public_key,
        aggregator_public_key=AGGREGATOR.public_key,
        update_sha256=_update_header().digest(),
        tokens_credited=65_536,
        accepted=True,
        reason="",
        timestamp_s=1_700_000_061.0,
        score=65_536.0,
        ledger_row_hash=hashlib.sha256(b"ledger row").digest(),
        merkle_proof=bytes([1]) + bytes(8) + (2).to_bytes(8, "big") + hashlib.sha256(b"sibling").digest(),
    )
    return Receipt(**(values | changes))


def _state_header(**changes: Any) -> StateHeader:
    values: dict[str, Any] = dict(
        run_id="tiny-stdlib",
        config_hash=CONFIG_HASH,
        round=7,
        new_version=7,
        aggregator_public_key=AGGREGATOR.public_key,
        payload_bytes=len(PAYLOAD),
        payload_sha256=payload_digest(PAYLOAD),
        shard=0,
        chunk_bytes=65536,
        chunks_sha256=hashlib.sha256(b"chunk digests").digest(),
        state_sha256=hashlib.sha256(b"master state").digest(),
        timestamp_s=1_700_000_062.0,
    )
    return StateHeader(**(values | changes))


def _tampered(value: Any) -> Any:
    """A different value of the same type, valid wherever `value` was."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str) and len(value) == 64:  # a config hash: change one hex digit
        return ("1" if value[0] == "0" else "0") + value[1:]
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, bytes):
        return bytes([value[0] ^ 1]) + value[1:]
    if isinstance(value, tuple):  # contributors: credit the first one a token more
        (key, tokens), *rest = value
        return ((key, tokens + 1), *rest)
    raise AssertionError(f"no tampering rule for {value!r}")


def _assert_one_line(error: EnvelopeError) -> None:
    assert "\n" not in str(error)


def _names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def test_signed_update_verifies_and_round_trips() -> None:
    # Prepare
    signed = sign_update(_update_header(), PEER)
    # Execute
    decoded = SignedUpdate.from_bytes(signed.to_bytes())
    # Assert
    decoded.verify()
    decoded.verify_payload(PAYLOAD)
    assert decoded == signed


def test_signed_aggregate_verifies_and_round_trips() -> None:
    signed = sign_aggregate(_aggregate_header(), AGGREGATOR)

    decoded = SignedAggregate.from_bytes(signed.to_bytes())

    decoded.verify({AGGREGATOR.public_key})
    decoded.verify_payload(PAYLOAD)
    assert decoded == signed


def test_signed_receipt_verifies_and_round_trips() -> None:
    signed = sign_receipt(_receipt(accepted=False, tokens_credited=0, reason="norm outlier"), AGGREGATOR)

    decoded = SignedReceipt.from_bytes(signed.to_bytes())

    decoded.verify(AGGREGATOR.public_key)
    assert decoded == signed


@pytest.mark.parametrize("name", _names(UpdateHeader))
def test_tampering_with_any_update_field_fails_verification(name: str) -> None:
    # Prepare
    signed = sign_update(_update_header(), PEER)
    # Execute / Assert: either the tampered header is refused outright or its signature no longer verifies
    with pytest.raises(EnvelopeError) as error:
        header = dataclasses.replace(signed.header, **{name: _tampered(getattr(signed.header, name))})
        SignedUpdate(header=header, signature=signed.signature).verify()
    _assert_one_line(error.value)


@pytest.mark.parametrize("name", _names(AggregateHeader))
def test_tampering_with_any_aggregate_field_fails_verification(name: str) -> None:
    signed = sign_aggregate(_aggregate_header(), AGGREGATOR)

    with pytest.raises(EnvelopeError) as error:
        header = dataclasses.replace(signed.header, **{name: _tampered(getattr(signed.header, name))})
        # Trust the tampered key too, so it is the signature check that must catch it.
        SignedAggregate(header=header, signature=signed.signature).verify(
            {AGGREGATOR.public_key, header.aggregator_public_key}
        )

    _assert_one_line(error.value)


def test_signed_state_verifies_and_round_trips() -> None:
    signed = sign_state(_state_header(), AGGREGATOR)

    decoded = SignedState.from_bytes(signed.to_bytes())

    decoded.verify({AGGREGATOR.public_key})
    decoded.verify_payload(PAYLOAD)
    assert decoded == signed
    with pytest.raises(EnvelopeError, match="not one of the run's 1 trusted aggregator keys"):
        decoded.verify({PEER.public_key})


@pytest.mark.parametrize("name", _names(StateHeader))
def test_tampering_with_any_state_field_fails_verification(name: str) -> None:
    signed = sign_state(_state_header(), AGGREGATOR)

    with pytest.raises(EnvelopeError) as error:
        header = dataclasses.replace(signed.header, **{name: _tampered(getattr(signed.header, name))})
        SignedState(header=header, signature=signed.signature).verify(
            {AGGREGATOR.public_key, header.aggregator_public_key}
        )

    _assert_one_line(error.value)


@pytest.mark.parametrize("name", _names(Receipt))
def test_tampering_with_any_receipt_field_fails_verification(name: str) -> None:
    signed = sign_receipt(_receipt(), AGGREGATOR)

    with pytest.raises(EnvelopeError) as error:
        receipt = dataclasses.replace(signed.receipt, **{name: _tampered(getattr(signed.receipt, name))})
        SignedReceipt(receipt=receipt, signature=signed.signature).verify(receipt.aggregator_public_key)

    _assert_one_line(error.value)


@HYPOTHESIS
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_changing_any_wire_byte_is_refused_or_changes_nothing(position: int, flip: int) -> None:
    # Prepare: msgpack has a few spellings of one value (int16 vs uint16); those decode to the same header.
    signed = sign_update(_update_header(tokens=300, payload_bytes=70_000), PEER)
    data = bytearray(signed.to_bytes())
    data[position % len(data)] ^= flip
    # Execute
    try:
        decoded = SignedUpdate.from_bytes(bytes(data))
        decoded.verify()
    except EnvelopeError:
        return
    # Assert
    assert decoded == signed


def test_a_flipped_payload_byte_fails_verify_payload() -> None:
    signed = sign_update(_update_header(), PEER)
    payload = bytearray(PAYLOAD)
    payload[len(payload) // 2] ^= 0x01

    with pytest.raises(EnvelopeError, match="sha256 does not match"):
        signed.verify_payload(bytes(payload))


def test_a_payload_of_the_wrong_length_fails_verify_payload() -> None:
    signed = sign_aggregate(_aggregate_header(), AGGREGATOR)

    with pytest.raises(EnvelopeError, match="the signed header says"):
        signed.verify_payload(PAYLOAD + b"\0")


def test_signatures_do_not_cross_message_kinds() -> None:
    # Prepare: the same body bytes under another kind's domain tag
    signed = sign_update(_update_header(), PEER)
    body = signed.header.canonical_bytes()
    # Execute / Assert
    assert verify_signature(PEER.public_key, signed.signature, UpdateHeader.DOMAIN + body)
    assert not verify_signature(PEER.public_key, signed.signature, Receipt.DOMAIN + body)
    assert not verify_signature(PEER.public_key, signed.signature, AggregateHeader.DOMAIN + body)
    with pytest.raises(EnvelopeError, match="expected a potluck/receipt envelope"):
        SignedReceipt.from_bytes(signed.to_bytes())


def test_an_update_signature_presented_on_a_receipt_fails() -> None:
    # Prepare: a peer that is also an aggregator signs an update; someone staples that signature to a receipt
    signed_update = sign_update(_update_header(peer_public_key=AGGREGATOR.public_key), AGGREGATOR)
    # Execute / Assert
    with pytest.raises(EnvelopeError, match="signature does not verify"):
        SignedReceipt(receipt=_receipt(), signature=signed_update.signature).verify(AGGREGATOR.public_key)


def test_domain_tags_are_distinct_and_terminated() -> None:
    tags = [UpdateHeader.DOMAIN, AggregateHeader.DOMAIN, Receipt.DOMAIN]

    assert len(set(tags)) == 3
    assert all(tag.endswith(b"\0") and tag.count(b"\0") == 1 for tag in tags)


def test_signed_bytes_are_spelled_exactly_as_documented() -> None:
    # Prepare: the wire format spelled by hand, msgpack byte by byte. If this test fails, every node's
    # signatures change: bump PROTOCOL_VERSION rather than editing the expected bytes.
    config_hash = "0" * 64
    common = b"\x04" + b"\xa1r" + b"\xd9\x40" + b"0" * 64 + b"\x01"  # version 4, run "r", str8 hash, round 1
    key, zeros = b"\xc4\x20" + bytes(range(32)), b"\xc4\x20" + bytes(32)  # bin8 of 32 bytes
    timestamp = b"\xcb" + struct.pack(">d", 1.5)  # always float64
    update = UpdateHeader(
        run_id="r",
        config_hash=config_hash,
        round=1,
        base_version=1,
        peer_public_key=bytes(range(32)),
        tokens=2,
        inner_steps=3,
        codec="none",
        payload_bytes=4,
        payload_sha256=bytes(32),
        nonce=bytes(16),
        timestamp_s=1.5,
    )
    aggregate = AggregateHeader(
        run_id="r",
        config_hash=config_hash,
        round=1,
        new_version=2,
        aggregator_public_key=bytes(range(32)),
        codec="none",
        payload_bytes=4,
        payload_sha256=bytes(32),
        state_sha256=bytes(32),
        contributors=((bytes(32), 5),),
        timestamp_s=1.5,
        updates_root=bytes(32),
        ledger_head=bytes(32),
        next_density=0.25,
    )
    receipt = Receipt(
        run_id="r",
        config_hash=config_hash,
        round=1,
        peer_public_key=bytes(32),
        aggregator_public_key=bytes(range(32)),
        update_sha256=bytes(32),
        tokens_credited=2,
        accepted=False,
        reason="late",
        timestamp_s=1.5,
    )
    # Execute / Assert
    assert update.signed_bytes() == (
        b"potluck/update/v1\0" + b"\x9d" + common  # array of 13
        + b"\x01" + key + b"\x02\x03" + b"\xa4none" + b"\x04" + zeros + b"\xc4\x10" + bytes(16) + timestamp
    )  # fmt: skip
    assert aggregate.signed_bytes() == (
        b"potluck/aggregate/v1\0" + b"\x9f" + common  # array of 15
        + b"\x02" + key + b"\xa4none" + b"\x04" + zeros + zeros
        + b"\xc4\x28" + bytes(32) + (5).to_bytes(8, "big")  # contributors: one 40-byte record
        + timestamp + zeros + zeros  # updates_root, ledger_head
        + b"\xcb" + struct.pack(">d", 0.25)  # next_density
    )  # fmt: skip
    assert receipt.signed_bytes() == (
        b"potluck/receipt/v1\0" + b"\x9e" + common  # array of 14
        + zeros + key + zeros + b"\x02" + b"\xc2" + b"\xa4late" + timestamp
        + b"\xcb" + struct.pack(">d", 0.0) + b"\xc4\x00" + b"\xc4\x00"  # score, no ledger row, no proof yet
    )  # fmt: skip


def _text(max_size: int, min_size: int = 1) -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8").filter(str.isprintable), min_size=min_size, max_size=max_size)


_COUNTS = st.integers(min_value=0, max_value=2**63 - 1)
_TIMES = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
_KEYS = st.binary(min_size=32, max_size=32)
_SHA256 = st.binary(min_size=32, max_size=32)
_HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
_UPDATE_FIELDS = st.fixed_dictionaries(
    {
        "run_id": _text(128),
        "config_hash": _HEX64,
        "round": _COUNTS,
        "base_version": _COUNTS,
        "peer_public_key": _KEYS,
        "tokens": _COUNTS,
        "inner_steps": _COUNTS,
        "codec": _text(64),
        "payload_bytes": _COUNTS,
        "payload_sha256": _SHA256,
        "nonce": st.binary(min_size=16, max_size=16),
        "timestamp_s": _TIMES,
    }
)
_AGGREGATE_FIELDS = st.fixed_dictionaries(
    {
        "run_id": _text(128),
        "config_hash": _HEX64,
        "round": _COUNTS,
        "new_version": _COUNTS,
        "aggregator_public_key": _KEYS,
        "codec": _text(64),
        "payload_bytes": _COUNTS,
        "payload_sha256": _SHA256,
        "state_sha256": _SHA256,
        "contributors": st.dictionaries(_KEYS, _COUNTS, max_size=20).map(lambda d: list(d.items())),
        "timestamp_s": _TIMES,
        "updates_root": _SHA256,
        "ledger_head": _SHA256,
    }
)
_RECEIPT_FIELDS = st.fixed_dictionaries(
    {
        "run_id": _text(128),
        "config_hash": _HEX64,
        "round": _COUNTS,
        "peer_public_key": _KEYS,
        "aggregator_public_key": _KEYS,
        "update_sha256": _SHA256,
        "tokens_credited": _COUNTS,
        "accepted": st.booleans(),
        "reason": _text(512, min_size=0),
        "timestamp_s": _TIMES,
        "score": st.floats(min_value=0, max_value=1e18, allow_nan=False, allow_infinity=False),
        "ledger_row_hash": st.one_of(st.just(b""), _SHA256),
        "merkle_proof": st.binary(max_size=MAX_MERKLE_PROOF_BYTES),
    }
)


@HYPOTHESIS
@given(values=_UPDATE_FIELDS, signature=st.binary(min_size=64, max_size=64))
def test_update_encoding_is_deterministic_and_round_trips(values: dict[str, Any], signature: bytes) -> None:
    # Execute
    first, second = UpdateHeader(**values), UpdateHeader(**values)
    signed = SignedUpdate(header=first, signature=signature)
    # Assert
    assert first.canonical_bytes() == second.canonical_bytes()
    assert SignedUpdate.from_bytes(signed.to_bytes()) == signed
    assert SignedUpdate.from_bytes(signed.to_bytes()).to_bytes() == signed.to_bytes()


@HYPOTHESIS
@given(values=_AGGREGATE_FIELDS, signature=st.binary(min_size=64, max_size=64), data=st.data())
def test_aggregate_encoding_is_deterministic_and_round_trips(
    values: dict[str, Any], signature: bytes, data: st.DataObject
) -> None:
    # Prepare: the same contributors listed in another order
    shuffled = values | {"contributors": data.draw(st.permutations(values["contributors"]))}
    # Execute
    first, second = AggregateHeader(**values), AggregateHeader(**shuffled)
    signed = SignedAggregate(header=first, signature=signature)
    # Assert
    assert first == second
    assert first.canonical_bytes() == second.canonical_bytes()
    assert SignedAggregate.from_bytes(signed.to_bytes()) == signed


@HYPOTHESIS
@given(values=_RECEIPT_FIELDS, signature=st.binary(min_size=64, max_size=64))
def test_receipt_encoding_is_deterministic_and_round_trips(values: dict[str, Any], signature: bytes) -> None:
    first, second = Receipt(**values), Receipt(**values)
    signed = SignedReceipt(receipt=first, signature=signature)

    assert first.canonical_bytes() == second.canonical_bytes()
    assert SignedReceipt.from_bytes(signed.to_bytes()) == signed


def test_digest_names_the_signed_bytes() -> None:
    header = _update_header()

    assert header.digest() == hashlib.sha256(header.signed_bytes()).digest()
    assert header.digest() != _update_header(nonce=new_nonce()).digest()


SIGNED_KINDS = [SignedUpdate, SignedAggregate, SignedReceipt, SignedState]


@HYPOTHESIS
@given(data=st.binary(max_size=600))
@pytest.mark.parametrize("kind", SIGNED_KINDS)
def test_random_bytes_raise_only_envelope_error(kind: Any, data: bytes) -> None:
    try:
        kind.from_bytes(data)
    except EnvelopeError as error:
        _assert_one_line(error)


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=80),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


def _valid_wire(kind: Any) -> bytes:
    if kind is SignedUpdate:
        return sign_update(_update_header(), PEER).to_bytes()
    if kind is SignedAggregate:
        return sign_aggregate(_aggregate_header(), AGGREGATOR).to_bytes()
    if kind is SignedState:
        return sign_state(_state_header(), AGGREGATOR).to_bytes()
    return sign_receipt(_receipt(), AGGREGATOR).to_bytes()


@HYPOTHESIS
@given(data=st.data(), value=_MSGPACK_VALUES)
@pytest.mark.parametrize("kind", SIGNED_KINDS)
def test_a_wrong_typed_field_raises_only_envelope_error(kind: Any, data: st.DataObject, value: Any) -> None:
    # Prepare: a well-formed envelope with one header field (or the signature) replaced by any msgpack value
    outer = msgpack.unpackb(_valid_wire(kind))
    if data.draw(st.booleans()):
        outer[1][data.draw(st.integers(min_value=0, max_value=len(outer[1]) - 1))] = value
    else:
        outer[2] = value
    # Execute
    try:
        decoded = kind.from_bytes(msgpack.packb(outer, use_bin_type=True))
    except EnvelopeError as error:
        _assert_one_line(error)
        return
    # Assert: whatever got through is still a well-formed message
    assert kind.from_bytes(decoded.to_bytes()) == decoded


@pytest.mark.parametrize("kind", SIGNED_KINDS)
def test_every_truncation_raises_envelope_error(kind: Any) -> None:
    data = _valid_wire(kind)

    for length in range(len(data)):
        with pytest.raises(EnvelopeError):
            kind.from_bytes(data[:length])


@pytest.mark.parametrize("kind", SIGNED_KINDS)
def test_trailing_bytes_raise_envelope_error(kind: Any) -> None:
    with pytest.raises(EnvelopeError, match="not valid msgpack"):
        kind.from_bytes(_valid_wire(kind) + b"\0")


def test_oversize_envelopes_are_refused_before_parsing() -> None:
    data = sign_update(_update_header(), PEER).to_bytes()

    with pytest.raises(EnvelopeError, match=f"is {len(data)} bytes, over the 100-byte limit"):
        SignedUpdate.from_bytes(data, max_bytes=100)


@pytest.mark.parametrize(
    "hostile",
    [
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion elements
        b"\xdc\x27\x10" * 1000,  # nested arrays of 10,000 elements each
        b"\x91" * 2000,  # nesting deeper than any message
        b"\xc6\xff\xff\xff\xff",  # a bin claiming 4 GiB
        b"\xdf\x00\x00\x00\x01\xa1k\xc0",  # a map
        b"\xd6\xff" + bytes(4),  # a msgpack timestamp extension
    ],
)
def test_hostile_size_claims_are_refused(hostile: bytes) -> None:
    with pytest.raises(EnvelopeError):
        SignedAggregate.from_bytes(hostile)


def test_the_largest_aggregate_fits_the_default_limit() -> None:
    contributors = [(index.to_bytes(32, "big"), 2**63 - 1) for index in range(MAX_CONTRIBUTORS)]
    signed = sign_aggregate(_aggregate_header(contributors=contributors), AGGREGATOR)

    decoded = SignedAggregate.from_bytes(signed.to_bytes())

    decoded.verify({AGGREGATOR.public_key})
    assert len(decoded.header.contributors) == MAX_CONTRIBUTORS


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (PROTOCOL_VERSION + 1, rf"peer speaks protocol v{PROTOCOL_VERSION + 1}, this node speaks v{PROTOCOL_VERSION}; "
         r"upgrade potluck from where you installed it$"),
        (PROTOCOL_VERSION - 1, r"the peer must upgrade potluck"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("kind", SIGNED_KINDS)
def test_other_protocol_versions_are_refused_with_an_upgrade_hint(kind: Any, version: int, expected: str) -> None:
    # Prepare: a newer node may change anything after the version, so drop a field too
    outer = msgpack.unpackb(_valid_wire(kind))
    outer[1][0] = version
    outer[1].pop()
    # Execute / Assert
    with pytest.raises(EnvelopeError, match=expected):
        kind.from_bytes(msgpack.packb(outer, use_bin_type=True))


@pytest.mark.parametrize(
    ("build", "changes", "field"),
    [
        (_update_header, {"round": -1}, "round"),
        (_update_header, {"tokens": True}, "tokens"),
        (_update_header, {"tokens": 2**63}, "tokens"),
        (_update_header, {"inner_steps": 1.0}, "inner_steps"),
        (_update_header, {"peer_public_key": b"k" * 31}, "peer_public_key"),
        (_update_header, {"peer_public_key": "ab" * 32}, "peer_public_key"),
        (_update_header, {"payload_sha256": b"s" * 33}, "payload_sha256"),
        (_update_header, {"nonce": b"n" * 15}, "nonce"),
        (_update_header, {"config_hash": CONFIG_HASH.upper()}, "config_hash"),
        (_update_header, {"config_hash": CONFIG_HASH[:-1]}, "config_hash"),
        (_update_header, {"run_id": ""}, "run_id"),
        (_update_header, {"run_id": "r" * 129}, "run_id"),
        (_update_header, {"run_id": "two\nlines"}, "run_id"),
        (_update_header, {"codec": "c" * 65}, "codec"),
        (_update_header, {"timestamp_s": math.nan}, "timestamp_s"),
        (_update_header, {"timestamp_s": -1.0}, "timestamp_s"),
        (_update_header, {"timestamp_s": 1_700_000_000}, "timestamp_s"),
        (_aggregate_header, {"contributors": [(PEER.public_key, 1), (PEER.public_key, 2)]}, "contributors"),
        (_aggregate_header, {"contributors": [(PEER.public_key, -1)]}, "contributors"),
        (_aggregate_header, {"contributors": [(PEER.public_key,)]}, "contributors"),
        (_aggregate_header, {"contributors": [(b"k", 1)]}, "contributors"),
        (_aggregate_header, {"contributors": {PEER.public_key: 1}}, "contributors"),
        (_aggregate_header, {"contributors": [(bytes(32), 1)] * (MAX_CONTRIBUTORS + 1)}, "contributors"),
        (_aggregate_header, {"state_sha256": None}, "state_sha256"),
        (_aggregate_header, {"next_density": math.nan}, "next_density"),
        (_aggregate_header, {"next_density": 2.0}, "next_density"),
        (_aggregate_header, {"next_density": 1}, "next_density"),
        (_state_header, {"density": -0.5}, "density"),
        (_receipt, {"accepted": 1}, "accepted"),
        (_receipt, {"reason": "x" * 513}, "reason"),
        (_receipt, {"update_sha256": b""}, "update_sha256"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(build: Any, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(EnvelopeError, match=f"\\.{field} must be") as error:
        build(**changes)

    _assert_one_line(error.value)


def test_headers_of_another_protocol_version_cannot_be_built() -> None:
    with pytest.raises(EnvelopeError, match="upgrade potluck"):
        _update_header(protocol_version=PROTOCOL_VERSION + 1)


def test_signing_with_the_wrong_identity_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="cannot sign"):
        sign_update(_update_header(), AGGREGATOR)
    with pytest.raises(EnvelopeError, match="cannot sign"):
        sign_receipt(_receipt(), PEER)


def test_aggregate_from_an_untrusted_key_is_refused_by_fingerprint() -> None:
    signed = sign_aggregate(_aggregate_header(), AGGREGATOR)

    with pytest.raises(EnvelopeError, match=f"signed by {AGGREGATOR.fingerprint}, which is not one of"):
        signed.verify({PEER.public_key})


def test_receipt_from_another_aggregator_is_refused() -> None:
    signed = sign_receipt(_receipt(), AGGREGATOR)

    with pytest.raises(EnvelopeError, match="names aggregator"):
        signed.verify(PEER.public_key)


@pytest.mark.parametrize("signature", [b"", b"s" * 63, "s" * 64, None])
def test_signed_wrappers_require_a_64_byte_signature(signature: Any) -> None:
    with pytest.raises(EnvelopeError, match="signature must be"):
        SignedUpdate(header=_update_header(), signature=signature)


def test_signed_wrappers_require_their_own_header_type() -> None:
    with pytest.raises(EnvelopeError, match="header must be a UpdateHeader"):
        SignedUpdate(header=_receipt(), signature=bytes(64))  # type: ignore[arg-type]


def test_new_nonce_is_16_fresh_bytes() -> None:
    nonces = {new_nonce() for _ in range(100)}

    assert len(nonces) == 100
    assert all(len(nonce) == 16 for nonce in nonces)
