"""The peer leaves on the aggregator's RUN_FINISHED code, not on the refusal's words."""

import asyncio
from types import SimpleNamespace

import pytest

from potluck.peer.runner import PeerRunner, RunFinished
from potluck.protocol.client import AggregatorRefused
from potluck.protocol.wire import RefusalCode


def _retrying(refusal: AggregatorRefused) -> None:
    runner = PeerRunner.__new__(PeerRunner)  # only _retrying's own state: no node, no trainer
    runner.options = SimpleNamespace(reconnect_timeout_s=1.0)  # type: ignore[assignment]

    async def call() -> None:
        raise refusal

    asyncio.run(runner._retrying("submitting", call))


def test_run_finished_code_ends_the_peer_whatever_the_words() -> None:
    with pytest.raises(RunFinished):
        _retrying(AggregatorRefused("round 3 is still open", code=RefusalCode.RUN_FINISHED))


def test_words_alone_do_not_end_the_peer() -> None:
    with pytest.raises(AggregatorRefused):
        _retrying(AggregatorRefused("run 'x' has finished at round 3"))
