"""The chunk handler's rate cap: sends are spaced to the cap, and a send that would wait too long is "busy"."""

import asyncio
import time

import pytest

from potluck.protocol.chunk_server import MAX_PACING_WAIT_S, ChunkUnavailable, Pacer
from potluck.protocol.messages import BUSY_PREFIX
from potluck.protocol.wire import RefusalCode


def test_sends_are_spaced_to_the_cap() -> None:
    pacer = Pacer(1_000_000)  # 1 MB/s: two 50 kB sends take 50 ms between them

    async def two_sends() -> float:
        started = time.monotonic()
        await pacer.take(50_000)
        await pacer.take(50_000)
        return time.monotonic() - started

    assert asyncio.run(two_sends()) >= 0.045


def test_a_send_that_would_wait_past_the_limit_is_answered_busy() -> None:
    pacer = Pacer(1_000)  # the first send of MAX_PACING_WAIT_S + 1 s of bytes leaves now, the next must wait that long

    async def sends() -> None:
        await pacer.take(int((MAX_PACING_WAIT_S + 1) * 1_000))
        await pacer.take(1)

    with pytest.raises(ChunkUnavailable, match=BUSY_PREFIX) as info:
        asyncio.run(sends())
    assert info.value.code is RefusalCode.BUSY


def test_a_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Pacer(0)
