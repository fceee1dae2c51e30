import asyncio
import gc
import logging

import pytest

from potluck.protocol.stopping import quiet_about_cancellation


async def _gather_left_cancelled() -> None:
    """What a DHT store leaves when its caller is cancelled: a gather whose child was cancelled, never read."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_about_cancellation)
    child = asyncio.ensure_future(asyncio.sleep(10))
    gathered = asyncio.gather(child)
    child.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert gathered.done()
    del gathered, child
    gc.collect()


def test_a_cancelled_future_left_unread_at_shutdown_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    # Execute
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(_gather_left_cancelled())
    # Assert
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_any_other_unread_exception_is_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    loop = asyncio.new_event_loop()
    # Execute
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        quiet_about_cancellation(loop, {"message": "Task exception was never retrieved", "exception": OSError("x")})
    loop.close()
    # Assert
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["Task exception was never retrieved"]
