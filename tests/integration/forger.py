"""A forging "aggregator" or state holder for the joiner tests (tests only): `python -m tests.integration.forger`.

`--tamper payload` / `--tamper resign`: it joins the real aggregator's DHT, fetches the real signed
state, and announces itself, under its own key, as an aggregator of the same run, serving that state's
manifest and chunks with one payload byte flipped (`payload`: the real header, which names another
key) or re-signed by its own key over the payload it changed (`resign`: signed, but not by anyone the
run trusts).

`--tamper chunks`: it poses as a peer that holds the state. It publishes, in every bucket of the holders'
key, a signed holder record that claims the version of shard 0 the last closed round made, and answers
every chunk request with bytes of the right size and the wrong content.

Prints JSON events: `ready` (with its multiaddr), `claimed` (a version it now claims to hold), `served`
per manifest or chunk request.
"""

import argparse
import asyncio
import dataclasses
import json
import time

from hivemind.utils import get_dht_time

from potluck.protocol.client import AggregatorLink, AggregatorRefused
from potluck.protocol.dht_schema import AGGREGATORS_KEY, AggregatorAnnouncement, sign_announcement
from potluck.protocol.envelope import payload_digest, sign_state
from potluck.protocol.holder_records import HolderRecord, holder_buckets, holders_key, sign_holder_record
from potluck.protocol.identity import Identity, generate_identity
from potluck.protocol.messages import CHUNK_HANDLER, MANIFEST_HANDLER, pack_envelope
from potluck.protocol.node import Node, parse_join_address, peer_id_of, start_node
from potluck.protocol.state_chunks import ChunkRequest, chunk_digests, chunk_of, digests_sha256
from potluck.protocol.wire import MessageKind, RefusalCode, read_frame_from_stream, write_frame


def _served(what: str) -> None:
    print(json.dumps({"event": "served", "what": what}), flush=True)


async def forge_aggregator(node: Node, identity: Identity, join: str, tamper: str) -> None:
    link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
    signed, payload, _ = await link.fetch_state(generate_identity().public_key)
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0x01
    bad_payload = bytes(bad)
    digests = chunk_digests(payload, signed.header.chunk_bytes)  # the real manifest, with flipped chunks
    if tamper == "resign":
        digests = chunk_digests(bad_payload, signed.header.chunk_bytes)
        header = dataclasses.replace(
            signed.header,
            aggregator_public_key=identity.public_key,
            payload_sha256=payload_digest(bad_payload),
            chunks_sha256=digests_sha256(digests),
        )
        signed = sign_state(header, identity)
    manifest = pack_envelope(signed.to_bytes(), b"".join(digests))

    async def serve_manifest(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame_from_stream(reader, max_body_bytes=4096, expected_kinds={MessageKind.MANIFEST_REQUEST})
        await write_frame(writer, kind=MessageKind.MANIFEST, body=manifest)
        writer.close()
        _served("manifest")

    async def serve_chunk(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_frame_from_stream(reader, max_body_bytes=4096, expected_kinds={MessageKind.CHUNK_REQUEST})
        await write_frame(writer, kind=MessageKind.CHUNK, body=chunk_of(bad_payload, ChunkRequest.from_bytes(body)))
        writer.close()
        _served("chunk")

    await node.p2p.add_binary_stream_handler(MANIFEST_HANDLER, serve_manifest)
    await node.p2p.add_binary_stream_handler(CHUNK_HANDLER, serve_chunk)
    maddrs = [str(m) for m in await node.p2p.get_visible_maddrs()]
    announcement = AggregatorAnnouncement(
        run_id=signed.header.run_id,
        config_hash=signed.header.config_hash,
        public_key=identity.public_key,
        libp2p_peer_id=node.p2p.peer_id.to_bytes(),
        maddrs=tuple(maddrs),
        round=signed.header.round,
        timestamp_s=time.time() + 3600,  # the freshest announcement of all
    )
    subkey, value = sign_announcement(announcement, identity)
    assert await node.dht.store(AGGREGATORS_KEY, value, get_dht_time() + 600, subkey=subkey)
    print(json.dumps({"event": "ready", "maddrs": maddrs}), flush=True)
    await asyncio.Event().wait()  # until killed


async def forge_holder(node: Node, identity: Identity, join: str) -> None:
    """Claim to hold whatever version is open, in every bucket a joiner may read, and serve garbage for every chunk.

    The version and the contributor count (which says how many buckets there are) come from the round's
    signed aggregate, which anyone may fetch: the strongest stranger writes where every joiner looks.
    """

    async def serve_chunk(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_frame_from_stream(reader, max_body_bytes=4096, expected_kinds={MessageKind.CHUNK_REQUEST})
        request = ChunkRequest.from_bytes(body)
        await write_frame(writer, kind=MessageKind.CHUNK, body=b"\x5a" * request.chunk_bytes)
        writer.close()
        _served("chunk")

    await node.p2p.add_binary_stream_handler(CHUNK_HANDLER, serve_chunk)
    maddrs = tuple(str(m) for m in await node.p2p.get_visible_maddrs())
    print(json.dumps({"event": "ready", "maddrs": list(maddrs)}), flush=True)
    link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
    # From the oldest aggregate the aggregator still holds, every version in turn, then each as its round closes:
    # whichever version a test waits for, it is claimed, however late this process started.
    next_round = 0
    while True:
        # a long-poll: it answers once round `next_round` has closed
        try:
            aggregate = (await link.fetch_aggregate(next_round, timeout_s=60))[0].header
        except AggregatorRefused as e:
            if e.code is RefusalCode.NOT_HELD:  # too old: on to the next
                next_round += 1
            else:  # not started yet, or busy: ask again
                await asyncio.sleep(0.2)
            continue
        except Exception:  # noqa: BLE001 - a long-poll cut (a deadline, the stream): ask again
            await asyncio.sleep(0.2)
            continue
        record = HolderRecord(
            holder=identity.public_key,
            libp2p_peer_id=node.p2p.peer_id.to_bytes(),
            maddrs=maddrs,
            config_hash=aggregate.config_hash,
            shards=((0, aggregate.new_version),),
            timestamp_s=time.time(),
        )
        subkey, value = sign_holder_record(record, identity)
        shard, version = 0, aggregate.new_version
        for bucket in range(holder_buckets(len(aggregate.contributors))):
            key = holders_key(aggregate.config_hash, shard=shard, version=version, bucket=bucket)
            assert await node.dht.store(key, value, get_dht_time() + 600, subkey=subkey)
        print(json.dumps({"event": "claimed", "version": version}), flush=True)
        next_round += 1


async def forge(join: str, tamper: str) -> None:
    identity = generate_identity()
    node = await start_node(initial_peers=[join], signer=identity)
    try:
        if tamper == "chunks":
            await forge_holder(node, identity, join)
        else:
            await forge_aggregator(node, identity, join, tamper)
    finally:
        await node.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.integration.forger", description=__doc__)
    parser.add_argument("--join", required=True)
    parser.add_argument("--tamper", choices=("payload", "resign", "chunks"), default="payload")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    asyncio.run(forge(args.join, args.tamper))


if __name__ == "__main__":
    main()
