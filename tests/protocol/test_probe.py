"""The probe request's layout (protocol/probe.py): round trip, bounds, and hostile bodies."""

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from potluck.protocol.probe import MAX_PROBE_BYTES, decode_probe_request, encode_probe_request
from potluck.protocol.wire import WireError


@given(upload_bytes=st.integers(0, 4096), reply_bytes=st.integers(0, MAX_PROBE_BYTES))
def test_request_round_trips(upload_bytes: int, reply_bytes: int) -> None:
    body = encode_probe_request(upload_bytes=upload_bytes, reply_bytes=reply_bytes)
    assert decode_probe_request(body) == reply_bytes
    assert len(body) - upload_bytes < 32  # the header is small: the body is almost all upload filler


def test_over_the_limit_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="reply_bytes must be between 0 and 8388608"):
        encode_probe_request(upload_bytes=0, reply_bytes=MAX_PROBE_BYTES + 1)


def _body(header: object, *, declared: int | None = None) -> bytes:
    packed = msgpack.packb(header)
    return struct.pack(">I", len(packed) if declared is None else declared) + packed


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "shorter than its 4-byte length prefix"),
        (_body({"reply_bytes": 1}, declared=10**6), "probe header length 1000000"),
        (struct.pack(">I", 1) + b"\xc1", "not msgpack"),
        (_body([1, 2]), "probe header must be"),
        (_body({"reply_bytes": -1}), "probe header must be"),
        (_body({"reply_bytes": MAX_PROBE_BYTES + 1}), "probe header must be"),
        (_body({"reply_bytes": True}), "probe header must be"),
        (_body({"reply_bytes": "10"}), "probe header must be"),
    ],
)
def test_hostile_bodies_are_one_line_wire_errors(body: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message) as caught:
        decode_probe_request(body)
    assert "\n" not in str(caught.value)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_wire_error(body: bytes) -> None:
    try:
        reply_bytes = decode_probe_request(body)
    except WireError:
        return
    assert 0 <= reply_bytes <= MAX_PROBE_BYTES
