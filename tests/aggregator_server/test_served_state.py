"""What an aggregator serves joiners: a signed manifest of its state's chunks, and the chunks of recent versions."""

import asyncio
import dataclasses
from pathlib import Path

import pytest

from potluck.aggregator_server.served_state import serve_state
from potluck.protocol.chunk_server import ChunkUnavailable
from potluck.protocol.envelope import SignedState
from potluck.protocol.identity import generate_identity
from potluck.protocol.messages import unpack_envelope
from potluck.protocol.state_chunks import ChunkRequest, check_manifest, chunk_of
from tests.aggregator_server.in_process import AGGREGATOR, closed_round_0, make_server

PEERS = [generate_identity() for _ in range(2)]


def test_the_manifest_is_signed_and_its_chunks_rebuild_the_payload(tmp_path: Path) -> None:
    served = asyncio.run(make_server(tmp_path).served_state())
    envelope, digest_bytes = unpack_envelope(served.manifest_body(), max_envelope_bytes=4096)
    signed = SignedState.from_bytes(envelope)
    signed.verify({AGGREGATOR.public_key})
    h = signed.header

    digests = check_manifest(h, digest_bytes)
    requests = [
        ChunkRequest(shard=0, version=0, payload_sha256=h.payload_sha256, chunk_bytes=h.chunk_bytes, index=i)
        for i in range(len(digests))
    ]

    assert len(digests) > 1  # even the tiny model's state comes in several chunks
    assert b"".join(chunk_of(served.payload, r) for r in requests) == served.payload
    assert (h.shard, h.new_version, h.payload_sha256) == (0, 0, served.payload_sha256)


def test_chunks_of_the_last_two_versions_are_served_and_older_or_unknown_ones_refused(tmp_path: Path) -> None:
    async def scenario():  # noqa: ANN202
        server = make_server(tmp_path)
        old = await server.served_state()
        await closed_round_0(server, PEERS)
        new = await server.served_state()
        request = ChunkRequest(shard=0, version=0, payload_sha256=old.payload_sha256, chunk_bytes=2**16, index=0)
        found = [await server.find_chunk_payload(request)]
        found.append(
            await server.find_chunk_payload(dataclasses.replace(request, version=1, payload_sha256=new.payload_sha256))
        )
        with pytest.raises(ChunkUnavailable, match="does not serve shard 0 v1 now"):
            await server.find_chunk_payload(dataclasses.replace(request, version=1, payload_sha256=b"x" * 32))
        with pytest.raises(ChunkUnavailable, match="does not serve shard 1 v0"):
            await server.find_chunk_payload(dataclasses.replace(request, shard=1))
        return old, new, found

    old, new, found = asyncio.run(scenario())

    assert (old.version, new.version) == (0, 1) and found == [old.payload, new.payload]


def test_a_standby_serves_chunks_of_the_copy_it_follows_without_being_asked_for_a_manifest(tmp_path: Path) -> None:
    async def scenario():  # noqa: ANN202
        server = make_server(tmp_path)
        expected = serve_state(server.cfg, server.master, AGGREGATOR, shard=0)
        server.primary = generate_identity().public_key  # it follows that primary: nobody asks it for manifests
        request = ChunkRequest(shard=0, version=0, payload_sha256=expected.payload_sha256, chunk_bytes=2**16, index=0)
        return expected, await server.find_chunk_payload(request)

    expected, found = asyncio.run(scenario())

    assert found == expected.payload
