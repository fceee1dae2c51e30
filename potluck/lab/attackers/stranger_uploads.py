"""Stranger uploads: a flood of updates, each signed by a fresh key, that fail the aggregator's run check.

RED TEAM ONLY. Anyone can make a key per upload, so nothing an aggregator keeps for a key it has never
accepted an update from may grow with such uploads: once, each was a strike written to disk on the event
loop and never pruned, and a long flood made every upload take over a second. The updates are validly
signed (the signature check passes, so the aggregator attributes each to its key) but name another run,
so the second check refuses them; `flood` sends them through any `send` coroutine and counts the answers.

`python -m potluck.lab.attackers.stranger_uploads --join ADDR [--concurrency 4] [--batch 50]` floods a live
aggregator over libp2p (`libp2p_send`) until killed, printing a JSON `attack` line with the totals after each batch.
"""

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from potluck.errors import PotluckError
from potluck.lab.attackers.command import attacker_parser
from potluck.protocol.client import AggregatorLink
from potluck.protocol.envelope import SignedReceipt, SignedUpdate, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import generate_identity

# Uploads one (signed update, payload) and returns the aggregator's receipt.
Send = Callable[[SignedUpdate, bytes], Awaitable[SignedReceipt]]


@dataclass(frozen=True, kw_only=True, slots=True)
class FloodResult:
    """What a flood got back."""

    sent: int
    answers: dict[str, int]  # the receipts' reason codes ("accepted" for none), counted
    failed: int  # sends that got no receipt (refused, dropped or timed out on the way)
    seconds: float


def stranger_update(
    *, run_id: str = "not-this-run", round_index: int = 0, payload_bytes: int = 1024
) -> tuple[SignedUpdate, bytes]:
    """One update of a run that is not the aggregator's, signed by a key made for it alone."""
    stranger = generate_identity()
    payload = os.urandom(payload_bytes)
    header = UpdateHeader(
        run_id=run_id,
        config_hash="0" * 64,
        round=round_index,
        base_version=round_index,
        peer_public_key=stranger.public_key,
        tokens=1024,
        inner_steps=8,
        codec="topk",
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=time.time(),
    )
    return sign_update(header, stranger), payload


async def flood(send: Send, *, count: int, concurrency: int = 4, payload_bytes: int = 1024) -> FloodResult:
    """Send `count` stranger uploads, `concurrency` at a time, and count the answers.

    Each sender yields to the event loop between uploads, as a network sender would, so the flood shares a
    test's loop with the honest traffic it is measured against.
    """
    answers: Counter[str] = Counter()
    failed = 0
    left = iter(range(count))
    started = time.perf_counter()

    async def sender() -> None:
        nonlocal failed
        for _ in left:
            update, payload = stranger_update(payload_bytes=payload_bytes)
            try:
                receipt = (await send(update, payload)).receipt
            except (PotluckError, OSError, TimeoutError):  # refused or dropped on the way: an answer too
                failed += 1
            else:
                answers["accepted" if receipt.accepted else receipt.reason.split(":", 1)[0]] += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return FloodResult(sent=count, answers=dict(answers), failed=failed, seconds=time.perf_counter() - started)


def libp2p_send(link: AggregatorLink, *, timeout_s: float = 30.0) -> Send:
    """A `Send` that uploads through the aggregator's real submit stream, as a peer's client does."""

    async def send(update: SignedUpdate, payload: bytes) -> SignedReceipt:
        receipt, _ = await link.submit(update, payload, timeout_s=timeout_s)
        return receipt

    return send


async def attack(join: str, *, concurrency: int, batch: int, payload_bytes: int) -> None:
    """Flood the aggregator at `join` with stranger uploads until cancelled, printing the totals after each batch."""
    from potluck.protocol.node import dial, parse_join_address, peer_id_of, start_node

    maddr = parse_join_address(join)
    node = await start_node(initial_peers=[maddr], client_mode=True)
    try:
        target = peer_id_of(maddr)
        await dial(node.p2p, target, [maddr])
        send = libp2p_send(AggregatorLink(node.p2p, target))
        answers: Counter[str] = Counter()
        sent = failed = 0
        while True:
            result = await flood(send, count=batch, concurrency=concurrency, payload_bytes=payload_bytes)
            sent, failed = sent + result.sent, failed + result.failed
            answers.update(result.answers)
            event = {"event": "attack", "time_s": time.time(), "sent": sent, "failed": failed, "answers": answers}
            print(json.dumps(event), flush=True)
    finally:
        await node.shutdown()


def main() -> None:
    """The attacker's command line (red team only)."""
    parser = attacker_parser("potluck.lab.attackers.stranger_uploads", __doc__)
    parser.add_argument("--concurrency", type=int, default=4, help="uploads in flight at once")
    parser.add_argument("--batch", type=int, default=50, help="uploads between two printed totals")
    parser.add_argument("--payload-bytes", type=int, default=1024, help="each upload's payload size")
    args = parser.parse_args()
    asyncio.run(attack(args.join, concurrency=args.concurrency, batch=args.batch, payload_bytes=args.payload_bytes))


if __name__ == "__main__":
    main()
