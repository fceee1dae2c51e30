"""Tests for potluck.protocol.messages: envelope framing, request bodies and the state payload, hostile input."""

import json
import struct

import msgpack
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.protocol.config import RunConfig
from potluck.protocol.config_files import dump_run_config
from potluck.protocol.messages import (
    MAX_REQUEST_BYTES,
    MessageError,
    aggregate_request,
    decode_state_payload,
    encode_state_payload,
    pack_envelope,
    parse_aggregate_request,
    parse_receipt_request,
    parse_state_request,
    parse_state_request_mode,
    receipt_request,
    state_request,
    unpack_envelope,
)

HYPOTHESIS = settings(max_examples=200, deadline=None)
CONFIG = RunConfig(run_name="messages-test", local_steps=7, seed=3)


def _params() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "wte.weight": torch.randn(5, 4, generator=generator),
        "ln_f.bias": torch.tensor([0.0, -0.0, 1e-45, float(torch.finfo(torch.float32).max)]),
    }


def _outer() -> dict[str, torch.Tensor]:
    return {"wte.weight": torch.full((5, 4), 0.25), "ln_f.bias": torch.zeros(4)}


def _assert_one_line(error: MessageError) -> None:
    assert "\n" not in str(error)


# --- envelope framing ---


@HYPOTHESIS
@given(envelope=st.binary(max_size=300), payload=st.binary(max_size=300))
def test_pack_unpack_envelope_round_trips(envelope: bytes, payload: bytes) -> None:
    # Execute
    body = pack_envelope(envelope, payload)
    # Assert
    assert unpack_envelope(body, max_envelope_bytes=300) == (envelope, payload)


def test_an_envelope_over_the_limit_is_refused() -> None:
    body = pack_envelope(b"e" * 101, b"payload")

    with pytest.raises(MessageError, match="101-byte envelope; the limit is 100") as error:
        unpack_envelope(body, max_envelope_bytes=100)

    _assert_one_line(error.value)


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_a_body_too_short_for_the_length_prefix_is_refused(length: int) -> None:
    with pytest.raises(MessageError, match="too short"):
        unpack_envelope(pack_envelope(b"envelope", b"")[:length], max_envelope_bytes=1000)


def test_a_truncated_envelope_is_refused() -> None:
    # Prepare: the body ends inside the envelope it declares
    body = pack_envelope(b"e" * 50, b"")[:-1]
    # Execute / Assert
    with pytest.raises(MessageError, match="50-byte envelope.*the body holds 49"):
        unpack_envelope(body, max_envelope_bytes=1000)


def test_a_declared_length_beyond_the_body_is_refused_before_reading() -> None:
    body = struct.pack(">I", 2**32 - 1) + b"tiny"

    with pytest.raises(MessageError, match="declares a 4294967295-byte envelope"):
        unpack_envelope(body, max_envelope_bytes=2**32)


@HYPOTHESIS
@given(body=st.binary(max_size=64), limit=st.integers(min_value=0, max_value=64))
def test_random_bodies_unpack_within_limits_or_raise_message_error(body: bytes, limit: int) -> None:
    try:
        envelope, payload = unpack_envelope(body, max_envelope_bytes=limit)
    except MessageError as error:
        _assert_one_line(error)
        return
    assert len(envelope) <= limit
    assert struct.pack(">I", len(envelope)) + envelope + payload == body


# --- request bodies ---


@HYPOTHESIS
@given(key=st.binary(min_size=32, max_size=32))
def test_state_request_round_trips(key: bytes) -> None:
    assert parse_state_request(state_request(key)) == key


@pytest.mark.parametrize("client_mode", [True, False, None])
def test_a_state_request_may_say_the_peers_client_mode(client_mode: bool | None) -> None:
    key = bytes(range(32))

    body = state_request(key, client_mode=client_mode)

    assert parse_state_request_mode(body) == (key, client_mode)
    assert parse_state_request(body) == key


def test_a_non_bool_client_mode_is_ignored() -> None:
    body = msgpack.packb({"public_key": bytes(32), "client_mode": "yes"})

    assert parse_state_request_mode(body) == (bytes(32), None)


@HYPOTHESIS
@given(round_index=st.integers(min_value=0, max_value=2**63 - 1))
def test_aggregate_request_round_trips(round_index: int) -> None:
    assert parse_aggregate_request(aggregate_request(round_index)) == round_index


@HYPOTHESIS
@given(round_index=st.integers(min_value=0, max_value=2**63 - 1), digest=st.binary(min_size=32, max_size=32))
def test_receipt_request_round_trips(round_index: int, digest: bytes) -> None:
    assert parse_receipt_request(receipt_request(round_index, digest)) == (round_index, digest)


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb({"round": 1}),  # no update
        msgpack.packb({"round": -1, "update": bytes(32)}),
        msgpack.packb({"round": 1, "update": bytes(31)}),
        msgpack.packb({"round": 1, "update": "x" * 32}),
    ],
)
def test_a_malformed_receipt_request_is_one_line_message_error(body: bytes) -> None:
    with pytest.raises(MessageError) as error:
        parse_receipt_request(body)
    _assert_one_line(error.value)


@HYPOTHESIS
@given(data=st.binary(max_size=2 * MAX_REQUEST_BYTES))
@pytest.mark.parametrize("parse", [parse_state_request, parse_aggregate_request, parse_receipt_request])
def test_random_request_bytes_raise_only_message_error(parse: object, data: bytes) -> None:
    try:
        parse(data)  # type: ignore[operator]
    except MessageError as error:
        _assert_one_line(error)


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


@HYPOTHESIS
@given(value=_MSGPACK_VALUES)
def test_a_wrong_typed_public_key_raises_message_error(value: object) -> None:
    body = msgpack.packb({"public_key": value}, use_bin_type=True)
    try:
        key = parse_state_request(body)
    except MessageError as error:
        _assert_one_line(error)
        return
    assert isinstance(key, bytes) and len(key) == 32


@HYPOTHESIS
@given(value=_MSGPACK_VALUES)
def test_a_wrong_typed_round_raises_message_error(value: object) -> None:
    body = msgpack.packb({"round": value}, use_bin_type=True)
    try:
        round_index = parse_aggregate_request(body)
    except MessageError as error:
        _assert_one_line(error)
        return
    assert type(round_index) is int and 0 <= round_index < 2**63


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (msgpack.packb({"public_key": b"k" * 31}), "must be 32 bytes"),
        (msgpack.packb({"public_key": b"k" * 33}), "must be 32 bytes"),
        (msgpack.packb({"public_key": "k" * 32}), "must be 32 bytes"),
        (msgpack.packb({"key": b"k" * 32}), "must be a map with 'public_key'"),
        (msgpack.packb([b"k" * 32]), "must be a map with 'public_key'"),
        (msgpack.packb(b"k" * 65), "not valid msgpack"),  # over the 64-byte bin limit
        (b"\xc1", "not valid msgpack"),  # a reserved byte
        (msgpack.packb({"public_key": b"k" * 32}) + b"\0", "not valid msgpack"),  # trailing bytes
        (b"\x80" * (MAX_REQUEST_BYTES + 1), f"over the {MAX_REQUEST_BYTES}-byte limit"),
    ],
)
def test_bad_state_requests_are_refused(body: bytes, expected: str) -> None:
    with pytest.raises(MessageError, match=expected) as error:
        parse_state_request(body)

    _assert_one_line(error.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (msgpack.packb({"round": -1}), "non-negative integer"),
        (msgpack.packb({"round": 2**64 - 1}), "non-negative integer"),
        (msgpack.packb({"round": 1.0}), "non-negative integer"),
        (msgpack.packb({"round": True}), "non-negative integer"),
        (msgpack.packb({"round": "1"}), "non-negative integer"),
        (msgpack.packb({"round": None}), "non-negative integer"),
        (msgpack.packb({}), "must be a map with 'round'"),
        (b"", "not valid msgpack"),
        (msgpack.packb(list(range(5))), "not valid msgpack"),  # over the 4-element array limit
    ],
)
def test_bad_aggregate_requests_are_refused(body: bytes, expected: str) -> None:
    with pytest.raises(MessageError, match=expected) as error:
        parse_aggregate_request(body)

    _assert_one_line(error.value)


# --- state payload ---


def test_state_payload_round_trips_bit_exact() -> None:
    # Prepare
    params, outer = _params(), _outer()
    # Execute
    cfg, decoded_params, decoded_outer, _ = decode_state_payload(
        encode_state_payload(CONFIG, params=params, outer_state=outer)
    )
    # Assert
    assert cfg == CONFIG
    assert cfg.config_hash == CONFIG.config_hash
    assert decoded_params.keys() == params.keys()
    assert decoded_outer.keys() == outer.keys()
    for name, tensor in params.items():
        assert decoded_params[name].dtype == torch.float32
        assert decoded_params[name].view(torch.int32).equal(tensor.view(torch.int32))  # bits, -0.0 included
    for name, tensor in outer.items():
        assert decoded_outer[name].equal(tensor)


def test_state_payload_without_outer_state_round_trips() -> None:
    cfg, params, outer, _ = decode_state_payload(encode_state_payload(CONFIG, params=_params(), outer_state={}))

    assert cfg == CONFIG
    assert outer == {}
    assert params.keys() == _params().keys()


def test_state_payload_stores_other_dtypes_as_float32() -> None:
    params = {"w": torch.tensor([1.5, -2.0], dtype=torch.float64)}

    _, decoded, _, _ = decode_state_payload(encode_state_payload(CONFIG, params=params, outer_state={}))

    assert decoded["w"].dtype == torch.float32
    assert decoded["w"].tolist() == [1.5, -2.0]


@HYPOTHESIS
@given(data=st.binary(max_size=400))
def test_random_state_payload_bytes_raise_only_message_error(data: bytes) -> None:
    try:
        decode_state_payload(data)
    except MessageError as error:
        _assert_one_line(error)


def test_every_truncation_of_a_state_payload_raises_message_error() -> None:
    payload = encode_state_payload(CONFIG, params={"w": torch.ones(3)}, outer_state={})

    for length in range(len(payload)):
        with pytest.raises(MessageError):
            decode_state_payload(payload[:length])


def _metadata() -> dict[str, str]:
    return {"config": dump_run_config(CONFIG, "toml")}


@pytest.mark.parametrize(
    ("tensors", "metadata", "expected"),
    [
        ({"param/w": torch.ones(2, dtype=torch.float16)}, _metadata(), "'param/w' is torch.float16, expected float32"),
        ({"param/w": torch.ones(2, dtype=torch.int64)}, _metadata(), "is torch.int64, expected float32"),
        ({"params/w": torch.ones(2)}, _metadata(), "unexpected tensor 'params/w'"),
        ({"w": torch.ones(2)}, _metadata(), "unexpected tensor 'w'"),
        ({"param/w": torch.ones(2)}, None, "no string metadata"),
        ({"param/w": torch.ones(2)}, {"other": "x"}, "no valid run config"),
        ({"param/w": torch.ones(2)}, {"config": "not = [toml"}, "no valid run config"),
        ({"param/w": torch.ones(2)}, {"config": 'run_name = "bad name!"'}, "no valid run config"),
        ({"param/w": torch.ones(2)}, {"config": "unknown_field = 1"}, "no valid run config"),
    ],
)
def test_hostile_state_payloads_are_refused(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, expected: str
) -> None:
    # Prepare: a well-formed safetensors file that is not a valid state payload
    payload = safetensors.torch.save(tensors, metadata=metadata)
    # Execute / Assert
    with pytest.raises(MessageError, match=expected) as error:
        decode_state_payload(payload)
    _assert_one_line(error.value)


def test_non_string_metadata_is_refused() -> None:
    # Prepare: safetensors' own writer only takes strings, so forge the header by hand
    valid = safetensors.torch.save({"param/w": torch.ones(2)}, metadata=_metadata())
    (length,) = struct.unpack_from("<Q", valid)
    header = json.loads(valid[8 : 8 + length])
    header["__metadata__"] = {"config": 7}
    forged = json.dumps(header).encode()
    payload = struct.pack("<Q", len(forged)) + forged + valid[8 + length :]
    # Execute / Assert
    with pytest.raises(MessageError):
        decode_state_payload(payload)
