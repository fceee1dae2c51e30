"""The chunk manifest: what an aggregator signs about its state's chunks, and the request for one chunk."""

import dataclasses
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from potluck.protocol.envelope import StateHeader, payload_digest
from potluck.protocol.identity import generate_identity
from potluck.protocol.state_chunks import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    ChunkError,
    ChunkRequest,
    check_manifest,
    chunk_bytes_for,
    chunk_count,
    chunk_digests,
    chunk_of,
    digests_sha256,
    max_digest_bytes,
)

KEY = generate_identity().public_key


def _header(payload: bytes, chunk_bytes: int, digests: list[bytes]) -> StateHeader:
    return StateHeader(
        run_id="run",
        config_hash="0" * 64,
        round=3,
        new_version=3,
        aggregator_public_key=KEY,
        shard=0,
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        chunk_bytes=chunk_bytes,
        chunks_sha256=digests_sha256(digests),
        state_sha256=hashlib.sha256(b"state").digest(),
        timestamp_s=1.0,
    )


@given(st.integers(min_value=0, max_value=64 * 2**30))
def test_chunk_size_is_bounded_and_cuts_big_states_into_at_most_a_few_thousand_pieces(payload_bytes: int) -> None:
    size = chunk_bytes_for(payload_bytes)

    assert MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES
    assert chunk_count(payload_bytes, size) <= max(16, payload_bytes // MAX_CHUNK_BYTES + 1)


@given(st.binary(min_size=0, max_size=5 * MIN_CHUNK_BYTES // 2))
def test_the_chunks_of_a_payload_join_back_into_it_and_each_matches_its_digest(payload: bytes) -> None:
    digests = chunk_digests(payload, MIN_CHUNK_BYTES)
    requests = [
        ChunkRequest(shard=0, version=1, payload_sha256=b"p" * 32, chunk_bytes=MIN_CHUNK_BYTES, index=i)
        for i in range(len(digests))
    ]

    chunks = [chunk_of(payload, r) for r in requests]

    assert b"".join(chunks) == payload
    assert [hashlib.sha256(c).digest() for c in chunks] == digests
    assert check_manifest(_header(payload, MIN_CHUNK_BYTES, digests), b"".join(digests)) == digests


def test_a_manifest_whose_digests_differ_from_the_signed_ones_is_refused() -> None:
    payload = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(8192))  # 4 distinct chunks
    digests = chunk_digests(payload, MIN_CHUNK_BYTES)
    header = _header(payload, MIN_CHUNK_BYTES, digests)
    swapped = [digests[1], digests[0], *digests[2:]]

    with pytest.raises(ChunkError, match="do not match the ones its aggregator signed"):
        check_manifest(header, b"".join(swapped))
    with pytest.raises(ChunkError, match="lists 3 chunk digests, its header 4"):
        check_manifest(header, b"".join(digests[:3]))
    with pytest.raises(ChunkError, match="outside"):
        check_manifest(dataclasses.replace(header, chunk_bytes=MIN_CHUNK_BYTES - 1), b"".join(digests))


def test_a_manifest_reply_is_bounded_by_the_largest_state_a_peer_accepts() -> None:
    assert max_digest_bytes(8 * 2**30) == 8 * 2**30 // MIN_CHUNK_BYTES * 32  # 4 MiB: bounded before it is read


@given(
    st.integers(min_value=0, max_value=2**63 - 1),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=MIN_CHUNK_BYTES, max_value=MAX_CHUNK_BYTES),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_chunk_requests_round_trip(shard: int, version: int, sha: bytes, size: int, index: int) -> None:
    request = ChunkRequest(shard=shard, version=version, payload_sha256=sha, chunk_bytes=size, index=index)

    assert ChunkRequest.from_bytes(request.to_bytes()) == request


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x80", "must be a map of exactly"),
        (b"x" * 300, "over the 256-byte limit"),
    ],
)
def test_a_malformed_chunk_request_is_refused_in_one_line(body: bytes, message: str) -> None:
    with pytest.raises(ChunkError, match=message):
        ChunkRequest.from_bytes(body)


def test_a_chunk_request_out_of_bounds_is_refused() -> None:
    good = ChunkRequest(shard=0, version=1, payload_sha256=b"p" * 32, chunk_bytes=MIN_CHUNK_BYTES, index=0)
    too_small = dataclasses.replace(good, chunk_bytes=16)
    negative = dataclasses.replace(good, index=-1)

    with pytest.raises(ChunkError, match="chunk_bytes must be in"):
        ChunkRequest.from_bytes(too_small.to_bytes())
    with pytest.raises(ChunkError, match="non-negative integers"):
        ChunkRequest.from_bytes(negative.to_bytes())
    with pytest.raises(ChunkError, match="chunk 2 asked of a state of 2 chunks"):
        chunk_of(b"x" * (MIN_CHUNK_BYTES + 1), dataclasses.replace(good, index=2))
