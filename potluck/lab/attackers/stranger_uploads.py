"""Stranger uploads: a flood of updates, each signed by a fresh key, that fail the aggregator's run check.

RED TEAM ONLY. Anyone can make a key per upload, so nothing an aggregator keeps for a key it has never
accepted an update from may grow with such uploads: once, each was a strike written to disk on the event
loop and never pruned, and a long flood made every upload take over a second. The updates are validly
signed (the signature check passes, so the aggregator attributes each to its key) but name another run,
so the second check refuses them; `flood` sends them through any `send` coroutine and counts the answers.
"""

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from potluck.errors import PotluckError
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
