"""Tests for potluck.protocol.wire: frame round trips, chunking, hostile input and size limits, no network."""

import asyncio
import struct
from collections.abc import AsyncIterator, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.wire import (
    DEFAULT_CHUNK_BYTES,
    HEADER_BYTES,
    MAX_ERROR_BODY_BYTES,
    MessageKind,
    PeerRefusedError,
    RefusalCode,
    WireError,
    decode_error,
    encode_frame,
    encode_header,
    error_body,
    frame_chunks,
    read_frame,
    read_frame_from_stream,
    write_frame,
)

ALL_KINDS = set(MessageKind)
LIMIT = 4 * DEFAULT_CHUNK_BYTES


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _read(
    parts: Iterable[bytes], *, max_body_bytes: int = LIMIT, expected_kinds=ALL_KINDS
) -> tuple[MessageKind, bytes]:
    return asyncio.run(read_frame(_chunks(parts), max_body_bytes=max_body_bytes, expected_kinds=expected_kinds))


def _read_stream(data: bytes, *, max_body_bytes: int = LIMIT, expected_kinds=ALL_KINDS) -> tuple[MessageKind, bytes]:
    async def go() -> tuple[MessageKind, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame_from_stream(reader, max_body_bytes=max_body_bytes, expected_kinds=expected_kinds)

    return asyncio.run(go())


def _raw_header(
    *, magic: bytes = b"PLK", version: int = PROTOCOL_VERSION, kind: int = 3, body_bytes: int = 0
) -> bytes:
    return struct.pack(">3sBBQ", magic, version, kind, body_bytes)


SIZES = [0, 1, DEFAULT_CHUNK_BYTES - 1, DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES + 1, 3 * DEFAULT_CHUNK_BYTES + 17]


@pytest.mark.parametrize("kind", [k for k in MessageKind if k is not MessageKind.ERROR])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_every_kind_and_size(kind: MessageKind, size: int) -> None:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    chunks = list(frame_chunks(kind, body))
    assert chunks[0] == encode_header(kind, size) and len(chunks[0]) == HEADER_BYTES
    assert all(len(c) <= DEFAULT_CHUNK_BYTES for c in chunks)
    assert b"".join(chunks) == encode_frame(kind, body)
    assert _read(chunks) == (kind, body)
    assert _read([encode_frame(kind, body)]) == (kind, body)  # header and body in one chunk
    assert _read_stream(encode_frame(kind, body)) == (kind, body)


def test_error_frame_round_trips_when_expected_and_raises_otherwise() -> None:
    body = error_body("round 7 is closed\nsecond line dropped", code=RefusalCode.ROUND_OPEN)
    frame = encode_frame(MessageKind.ERROR, body)
    assert _read([frame]) == (MessageKind.ERROR, body)
    assert decode_error(body) == (RefusalCode.ROUND_OPEN, "round 7 is closed")
    with pytest.raises(PeerRefusedError, match=r"^peer refused the request: round 7 is closed$") as info:
        _read([frame], expected_kinds={MessageKind.SUBMIT_REPLY})
    assert (info.value.code, info.value.reason) == (RefusalCode.ROUND_OPEN, "round 7 is closed")
    with pytest.raises(PeerRefusedError, match="round 7 is closed") as info:
        _read_stream(frame, expected_kinds={MessageKind.SUBMIT_REPLY})
    assert info.value.code is RefusalCode.ROUND_OPEN


@pytest.mark.parametrize("code", list(RefusalCode))
def test_every_refusal_code_round_trips(code: RefusalCode) -> None:
    # Prepare
    frame = encode_frame(MessageKind.ERROR, error_body("no", code=code))
    # Execute
    with pytest.raises(PeerRefusedError) as info:
        _read_stream(frame, expected_kinds={MessageKind.STATE})
    # Assert
    assert (info.value.code, info.value.reason) == (code, "no")


@pytest.mark.parametrize("body", [b"", b"\xff", b"\xc8round 3 is gone", bytes([len(RefusalCode)]) + b"new reason"])
def test_an_unknown_or_missing_refusal_code_reads_as_unspecified(body: bytes) -> None:
    # Execute
    with pytest.raises(PeerRefusedError) as info:
        _read([encode_frame(MessageKind.ERROR, body)], expected_kinds={MessageKind.STATE})
    # Assert
    assert info.value.code is RefusalCode.UNSPECIFIED
    assert info.value.reason == body[1:].decode("utf-8", errors="replace")


@given(st.binary(max_size=MAX_ERROR_BODY_BYTES))
def test_any_error_body_decodes_to_a_code_and_one_printable_line(body: bytes) -> None:
    code, reason = decode_error(body)
    assert isinstance(code, RefusalCode)
    assert reason.isprintable()


def test_error_text_from_a_peer_is_kept_to_one_printable_line() -> None:
    frame = encode_frame(MessageKind.ERROR, b"\x01bad\r\n\x1b[31mred\xff")
    with pytest.raises(PeerRefusedError) as info:
        _read([frame], expected_kinds={MessageKind.STATE})
    assert str(info.value).isprintable() and info.value.reason.isprintable()
    assert info.value.code is RefusalCode.BUSY
    assert len(error_body("x" * 5000, code=RefusalCode.BUSY)) == MAX_ERROR_BODY_BYTES


def test_error_frame_over_its_cap_is_refused() -> None:
    with pytest.raises(WireError, match="limit of 1024 bytes"):
        _read([_raw_header(kind=MessageKind.ERROR, body_bytes=MAX_ERROR_BODY_BYTES + 1)])


def test_header_split_into_one_byte_chunks() -> None:
    frame = encode_frame(MessageKind.AGGREGATE, b"payload")
    assert _read([frame[i : i + 1] for i in range(len(frame))]) == (MessageKind.AGGREGATE, b"payload")


@given(body=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0, max_value=2100), max_size=8))
def test_any_split_of_a_frame_reads_back(body: bytes, cuts: list[int]) -> None:
    frame = encode_frame(MessageKind.STATE, body)
    bounds = [0, *sorted(c for c in cuts if c <= len(frame)), len(frame)]
    assert _read([frame[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]) == (MessageKind.STATE, body)


@given(data=st.binary(max_size=200), split=st.integers(min_value=1, max_value=16))
def test_hostile_bytes_raise_only_wire_error(data: bytes, split: int) -> None:
    for reader in (
        lambda: _read([data[i : i + split] for i in range(0, len(data), split)]),
        lambda: _read_stream(data),
    ):
        try:
            reader()
        except WireError:
            pass


@given(body=st.binary(max_size=64), kind=st.integers(min_value=0, max_value=255), data=st.binary(max_size=64))
def test_hostile_bytes_after_a_valid_magic_raise_only_wire_error(body: bytes, kind: int, data: bytes) -> None:
    frame = _raw_header(kind=kind, body_bytes=len(body)) + body + data
    for reader in (lambda: _read([frame], max_body_bytes=32), lambda: _read_stream(frame, max_body_bytes=32)):
        try:
            reader()
        except WireError:
            pass


def test_wrong_magic_is_refused_at_the_first_byte() -> None:
    async def http_then_hang() -> AsyncIterator[bytes]:
        yield b"G"
        raise AssertionError("pulled past the first wrong byte")

    with pytest.raises(WireError, match="not a potluck frame"):
        asyncio.run(read_frame(http_then_hang(), max_body_bytes=LIMIT, expected_kinds=ALL_KINDS))
    with pytest.raises(WireError, match="not a potluck frame"):
        _read_stream(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("theirs", "fix"),
    [
        (PROTOCOL_VERSION + 1, "upgrade potluck from where you installed it"),
        (PROTOCOL_VERSION - 1, "the peer must upgrade potluck"),
    ],
)
def test_other_protocol_version_says_who_must_upgrade(theirs: int, fix: str) -> None:
    expected = f"peer speaks protocol v{theirs}, this node speaks v{PROTOCOL_VERSION}; {fix}"
    frame = _raw_header(version=theirs)
    for read in (lambda: _read([frame]), lambda: _read_stream(frame)):
        with pytest.raises(WireError) as info:
            read()
        assert str(info.value) == expected


def test_unknown_and_unexpected_kinds_are_refused() -> None:
    with pytest.raises(WireError, match="unknown message kind 200"):
        _read([_raw_header(kind=200)])
    with pytest.raises(WireError, match=r"unexpected message kind STATE \(expected AGGREGATE, SUBMIT_REPLY\)"):
        _read(
            [encode_frame(MessageKind.STATE, b"")],
            expected_kinds={MessageKind.SUBMIT_REPLY, MessageKind.AGGREGATE},
        )


def test_over_limit_length_is_refused_before_any_body_byte_is_pulled() -> None:
    async def header_then_explode() -> AsyncIterator[bytes]:
        yield encode_header(MessageKind.SUBMIT, 2**63)
        raise AssertionError("pulled the body of an over-limit frame")

    with pytest.raises(WireError, match=r"declares a 9223372036854775808-byte SUBMIT body, over this node's limit"):
        asyncio.run(read_frame(header_then_explode(), max_body_bytes=LIMIT, expected_kinds=ALL_KINDS))


def test_over_limit_length_is_refused_by_the_stream_reader_without_reading_on() -> None:
    async def go() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_header(MessageKind.SUBMIT, LIMIT + 1) + b"body bytes stay unread")
        with pytest.raises(WireError, match="over this node's limit"):
            await read_frame_from_stream(reader, max_body_bytes=LIMIT, expected_kinds=ALL_KINDS)
        return await reader.read(100)

    assert asyncio.run(go()) == b"body bytes stay unread"


def test_limit_is_inclusive() -> None:
    body = b"x" * 100
    assert _read([encode_frame(MessageKind.SUBMIT, body)], max_body_bytes=100) == (MessageKind.SUBMIT, body)


@pytest.mark.parametrize("cut", [0, 1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 5])
def test_truncated_stream_is_refused(cut: int) -> None:
    frame = encode_frame(MessageKind.AGGREGATE, b"0123456789")[:cut]
    for read in (lambda: _read([frame]), lambda: _read_stream(frame)):
        with pytest.raises(WireError, match="stream ended"):
            read()


def test_trailing_bytes_in_the_last_chunk_are_refused() -> None:
    frame = encode_frame(MessageKind.SUBMIT_REPLY, b"ok")
    with pytest.raises(WireError, match="2 bytes after the SUBMIT_REPLY frame"):
        _read([frame + b"!!"])
    with pytest.raises(WireError, match="1 bytes after"):
        _read([frame[:-1], b"k!"])


def test_reader_does_not_pull_past_a_complete_frame() -> None:
    async def frame_then_hang() -> AsyncIterator[bytes]:
        yield encode_frame(MessageKind.STATE_REQUEST, b"")
        raise AssertionError("pulled another chunk after a complete frame")

    result = asyncio.run(read_frame(frame_then_hang(), max_body_bytes=LIMIT, expected_kinds=ALL_KINDS))
    assert result == (MessageKind.STATE_REQUEST, b"")


def test_stream_reader_leaves_the_next_frame_in_place() -> None:
    async def go() -> list[tuple[MessageKind, bytes]]:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame(MessageKind.SUBMIT, b"a") + encode_frame(MessageKind.SUBMIT, b"bc"))
        reader.feed_eof()
        return [await read_frame_from_stream(reader, max_body_bytes=LIMIT, expected_kinds=ALL_KINDS) for _ in "12"]

    assert asyncio.run(go()) == [(MessageKind.SUBMIT, b"a"), (MessageKind.SUBMIT, b"bc")]


def test_write_frame_sends_bounded_chunks_and_drains_each() -> None:
    class Writer:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.drains = 0

        def write(self, data: bytes) -> None:
            self.writes.append(bytes(data))

        async def drain(self) -> None:
            self.drains += 1

    writer = Writer()
    body = b"z" * (2 * DEFAULT_CHUNK_BYTES + 1)
    asyncio.run(write_frame(writer, kind=MessageKind.STATE, body=body))  # type: ignore[arg-type]
    assert b"".join(writer.writes) == encode_frame(MessageKind.STATE, body)
    assert max(len(w) for w in writer.writes) == DEFAULT_CHUNK_BYTES and writer.drains == len(writer.writes) == 4


def test_message_kind_values_are_stable() -> None:
    assert {k.name: int(k) for k in MessageKind} == {
        "STATE_REQUEST": 1,
        "STATE": 2,
        "SUBMIT": 3,
        "SUBMIT_REPLY": 4,
        "AGGREGATE_REQUEST": 5,
        "AGGREGATE": 6,
        "ERROR": 7,
        "PROBE": 8,
        "PROBE_REPLY": 9,
        "RECEIPT_REQUEST": 10,
        "RECEIPT": 11,
        "MANIFEST_REQUEST": 12,
        "MANIFEST": 13,
        "CHUNK_REQUEST": 14,
        "CHUNK": 15,
    }
    assert encode_header(MessageKind.SUBMIT, 258) == b"PLK" + bytes([PROTOCOL_VERSION, 3]) + (258).to_bytes(8, "big")


def test_bad_arguments_are_caller_errors_not_wire_errors() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        list(frame_chunks(MessageKind.STATE, b"x", chunk_bytes=0))
