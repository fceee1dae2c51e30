"""A forging "aggregator" for the joiner tests (tests only): `python -m tests.integration.forger --join MADDR`.

It joins the real aggregator's DHT, fetches the real signed state, and then announces itself, under
its own key, as an aggregator of the same run, serving that state with one payload byte flipped
(`--tamper payload`) or re-signed by its own key over a payload it changed (`--tamper resign`: signed,
but not by anyone the run trusts). Prints JSON events: `ready` (with its multiaddr), `served` per
state request.
"""

import argparse
import asyncio
import dataclasses
import json
import time

from hivemind.utils import get_dht_time

from potluck.protocol.client import AggregatorLink
from potluck.protocol.dht_schema import AGGREGATORS_KEY, AggregatorAnnouncement, sign_announcement
from potluck.protocol.envelope import payload_digest, sign_state
from potluck.protocol.identity import generate_identity
from potluck.protocol.messages import STATE_HANDLER, pack_envelope
from potluck.protocol.node import parse_join_address, peer_id_of, start_node
from potluck.protocol.wire import MessageKind, read_frame_from_stream, write_frame


async def forge(join: str, tamper: str) -> None:
    identity = generate_identity()
    node = await start_node(initial_peers=[join], signer=identity)
    try:
        link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
        signed, payload, _ = await link.fetch_state(generate_identity().public_key)
        bad = bytearray(payload)
        bad[len(bad) // 2] ^= 0x01
        if tamper == "resign":
            header = dataclasses.replace(
                signed.header,
                aggregator_public_key=identity.public_key,
                payload_sha256=payload_digest(bytes(bad)),
            )
            signed = sign_state(header, identity)
        body = pack_envelope(signed.to_bytes(), bytes(bad))

        async def serve_state(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_frame_from_stream(reader, max_body_bytes=4096, expected_kinds={MessageKind.STATE_REQUEST})
            await write_frame(writer, kind=MessageKind.STATE, body=body)
            writer.close()
            print(json.dumps({"event": "served"}), flush=True)

        await node.p2p.add_binary_stream_handler(STATE_HANDLER, serve_state)
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
    finally:
        await node.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.integration.forger", description=__doc__)
    parser.add_argument("--join", required=True)
    parser.add_argument("--tamper", choices=("payload", "resign"), default="payload")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    asyncio.run(forge(args.join, args.tamper))


if __name__ == "__main__":
    main()
