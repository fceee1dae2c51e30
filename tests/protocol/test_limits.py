"""Per-peer stream slots and stream deadlines: one remote's silent or unread streams cost it, not the others.

In process, no network: streams are asyncio StreamReaders fed by the test and writers that record what
they were given, or that never drain (a reader that never reads).
"""

import asyncio
from dataclasses import dataclass

import pytest

from potluck.protocol.chunk_server import chunk_handler
from potluck.protocol.limits import Busy, StreamLimits, peer_of
from potluck.protocol.messages import BUSY_PREFIX
from potluck.protocol.state_chunks import MIN_CHUNK_BYTES, ChunkError, ChunkRequest, chunk_bytes_for, chunk_of
from potluck.protocol.wire import (
    Deadlines,
    MessageKind,
    RefusalCode,
    decode_error,
    encode_frame,
    encode_header,
    read_frame_from_stream,
    write_frame,
)

QUICK = Deadlines(head_s=0.2, stall_s=0.2, floor_s=0.5, min_bytes_per_s=1e6)
PAYLOAD = bytes(range(256)) * (3 * MIN_CHUNK_BYTES // 256)  # three chunks at the manifest's size


@dataclass
class _Info:
    peer_id: bytes  # bytes have no to_bytes(): peer_of falls back to str()


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class _Writer:
    """A stream writer; with `stuck`, nothing it is given ever drains (the remote never reads)."""

    def __init__(self, *, stuck: bool = False) -> None:
        self.data = bytearray()
        self.stuck = stuck
        self.transport = _Transport()
        self.closed = False

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    async def drain(self) -> None:
        if self.stuck:
            await asyncio.Event().wait()  # never set: the far side never reads

    def close(self) -> None:
        self.closed = True


def _reader(data: bytes = b"", *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def _reply(writer: _Writer) -> tuple[MessageKind, bytes]:
    return await read_frame_from_stream(
        _reader(bytes(writer.data)), max_body_bytes=2**23, expected_kinds={MessageKind.CHUNK, MessageKind.ERROR}
    )


def _chunk_request(index: int, *, chunk_bytes: int = MIN_CHUNK_BYTES) -> bytes:
    request = ChunkRequest(shard=0, version=1, payload_sha256=b"p" * 32, chunk_bytes=chunk_bytes, index=index)
    return encode_frame(MessageKind.CHUNK_REQUEST, request.to_bytes())


def test_one_owner_is_refused_past_its_share_while_another_still_gets_a_slot() -> None:
    # Prepare
    limits = StreamLimits("uploads", total=4, per_owner=2)
    # Execute
    with limits.slot(b"attacker"), limits.slot(b"attacker"):
        with pytest.raises(Busy, match=f"^{BUSY_PREFIX}you already have 2 uploads"):
            with limits.slot(b"attacker"):
                pass
        with limits.slot(b"honest"):
            held_inside = (limits.held_by(b"attacker"), limits.held_by(b"honest"), limits.in_use)
    # Assert
    assert held_inside == (2, 1, 3)
    assert (limits.in_use, limits.held_by(b"attacker"), limits.refused) == (0, 0, 1)


def test_the_total_caps_all_owners_together_and_a_slot_is_freed_by_an_error() -> None:
    limits = StreamLimits("chunk streams", total=2, per_owner=1)

    with limits.slot(b"a"), limits.slot(b"b"):
        with pytest.raises(Busy, match="2 chunk streams already in progress"):
            with limits.slot(b"c"):
                pass
    with pytest.raises(RuntimeError), limits.slot(b"a"):
        raise RuntimeError("the handler failed")

    assert limits.in_use == 0 and limits.held_by(b"a") == 0


def test_a_stream_counts_against_each_of_its_owners_and_an_unknown_one_against_none() -> None:
    limits = StreamLimits("uploads", total=8, per_owner=1)

    with limits.slot(b"peer", b"key"):
        with pytest.raises(Busy):
            with limits.slot(b"other peer", b"key"):  # the same key behind another peer id
                pass
        with limits.slot(None), limits.slot(None):
            assert limits.in_use == 3


def test_limits_and_deadlines_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="per_owner <= total"):
        StreamLimits("x", total=1, per_owner=2)
    with pytest.raises(ValueError, match="positive"):
        Deadlines(stall_s=0)
    assert Deadlines(floor_s=10, min_bytes_per_s=1000).body_s(5000) == 15


def test_the_remote_peer_of_a_stream_is_its_peer_id() -> None:
    class _PeerID:
        def to_bytes(self) -> bytes:
            return b"\x12\x20id"

    assert peer_of(_Info(peer_id=_PeerID())) == b"\x12\x20id"  # type: ignore[arg-type]
    assert peer_of(object()) is None


def test_a_silent_stream_times_out_on_its_header_and_a_stalled_body_on_its_next_piece() -> None:
    async def silent() -> None:
        await read_frame_from_stream(
            _reader(eof=False), max_body_bytes=1024, expected_kinds={MessageKind.SUBMIT}, deadlines=QUICK
        )

    async def stalled() -> None:  # a whole header declaring 1 KiB, one byte of it, then nothing
        reader = _reader(encode_header(MessageKind.SUBMIT, 1024) + b"x", eof=False)
        await read_frame_from_stream(reader, max_body_bytes=1024, expected_kinds={MessageKind.SUBMIT}, deadlines=QUICK)

    with pytest.raises(TimeoutError):
        asyncio.run(silent())
    with pytest.raises(TimeoutError):
        asyncio.run(stalled())


def test_a_body_that_keeps_moving_is_read_whole_under_deadlines() -> None:
    body = bytes(300_000)  # several pieces

    async def read() -> bytes:
        reader = _reader(eof=False)

        async def trickle() -> None:
            frame = encode_frame(MessageKind.SUBMIT, body)
            for i in range(0, len(frame), 50_000):
                reader.feed_data(frame[i : i + 50_000])
                await asyncio.sleep(0)  # hand the loop to the reader between pieces
            reader.feed_eof()

        feeding = asyncio.create_task(trickle())
        _, got = await read_frame_from_stream(
            reader, max_body_bytes=len(body), expected_kinds={MessageKind.SUBMIT}, deadlines=QUICK
        )
        await feeding
        return got

    assert asyncio.run(read()) == body


def test_a_reply_nobody_reads_times_out_and_aborts_its_stream() -> None:
    writer = _Writer(stuck=True)

    async def send() -> None:
        await write_frame(writer, kind=MessageKind.CHUNK, body=bytes(MIN_CHUNK_BYTES), deadlines=QUICK)  # type: ignore[arg-type]

    with pytest.raises(TimeoutError):
        asyncio.run(send())
    assert writer.transport.aborted


def test_a_chunk_is_served_only_at_the_manifests_size_never_the_askers() -> None:
    asked = ChunkRequest(shard=0, version=1, payload_sha256=b"p" * 32, chunk_bytes=4 * MIN_CHUNK_BYTES, index=0)

    with pytest.raises(ChunkError, match=f"this state's manifest has {MIN_CHUNK_BYTES}"):
        chunk_of(PAYLOAD, asked)
    assert chunk_bytes_for(len(PAYLOAD)) == MIN_CHUNK_BYTES


async def _find(request: ChunkRequest) -> bytes:
    return PAYLOAD


def test_a_peer_past_its_chunk_share_hears_busy_while_another_peer_is_served() -> None:
    # Prepare: a handler with 4 slots, 2 per peer; the attacker's two replies are never read
    handle = chunk_handler(_find, max_streams=4, per_peer=2, deadlines=Deadlines(stall_s=30, floor_s=30))
    attacker, honest = _Info(peer_id=b"attacker"), _Info(peer_id=b"honest")

    async def scenario() -> tuple[tuple[MessageKind, bytes], tuple[MessageKind, bytes]]:
        stuck = [
            asyncio.create_task(handle(attacker, _reader(_chunk_request(i)), _Writer(stuck=True))) for i in range(2)
        ]
        await asyncio.sleep(0.05)  # let both take their slots and block on their writes
        refused, served = _Writer(), _Writer()
        # Execute
        await handle(attacker, _reader(_chunk_request(2)), refused)  # type: ignore[arg-type]
        await handle(honest, _reader(_chunk_request(1)), served)  # type: ignore[arg-type]
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        return await _reply(refused), await _reply(served)

    (refused_kind, refused_body), (served_kind, served_body) = asyncio.run(scenario())
    # Assert: refused with the BUSY code after its request was read; the honest peer got its chunk
    assert refused_kind is MessageKind.ERROR
    assert decode_error(refused_body)[0] is RefusalCode.BUSY
    assert (served_kind, served_body) == (MessageKind.CHUNK, PAYLOAD[MIN_CHUNK_BYTES : 2 * MIN_CHUNK_BYTES])


def test_unread_chunk_replies_give_their_slots_back_within_the_stall_limit() -> None:
    # Prepare: one slot in all; its first asker never reads
    handle = chunk_handler(_find, max_streams=1, per_peer=1, deadlines=QUICK)
    greedy, stuck = _Info(peer_id=b"greedy"), _Writer(stuck=True)

    async def scenario() -> tuple[MessageKind, bytes]:
        # Execute: the unread reply times out, then the next asker is served from the freed slot
        await asyncio.wait_for(handle(greedy, _reader(_chunk_request(0)), stuck), 5)  # type: ignore[arg-type]
        served = _Writer()
        await handle(_Info(peer_id=b"honest"), _reader(_chunk_request(0)), served)  # type: ignore[arg-type]
        return await _reply(served)

    kind, body = asyncio.run(scenario())
    # Assert
    assert stuck.transport.aborted
    assert (kind, body) == (MessageKind.CHUNK, PAYLOAD[:MIN_CHUNK_BYTES])


def test_a_deadlined_write_goes_in_pieces_a_slow_honest_reader_drains_within_the_stall_limit() -> None:
    deadlines = Deadlines(stall_s=10, min_bytes_per_s=16 * 1024)
    writes: list[int] = []

    class _Counting(_Writer):
        def write(self, chunk: bytes) -> None:
            writes.append(len(chunk))

    asyncio.run(write_frame(_Counting(), kind=MessageKind.CHUNK, body=bytes(300_000), deadlines=deadlines))  # type: ignore[arg-type]

    assert max(writes) <= deadlines.piece_bytes() <= deadlines.stall_s * deadlines.min_bytes_per_s / 2
    assert sum(writes) == 300_000 + 13
