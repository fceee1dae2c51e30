"""The peer leaves on the aggregator's RUN_FINISHED code, not on the refusal's words."""

import asyncio

import pytest

from potluck.peer.options import PeerOptions, RunFinished
from potluck.peer.records import HeldOutScore, Tally
from potluck.peer.sync import Sync
from potluck.protocol.client import AggregatorRefused
from potluck.protocol.identity import generate_identity
from potluck.protocol.wire import RefusalCode


def _retrying(refusal: AggregatorRefused) -> None:
    sync = Sync(
        None,  # type: ignore[arg-type]  # a refusal is judged before any node is asked
        generate_identity(),
        PeerOptions(join=(), reconnect_timeout_s=1.0),
        join_addrs=[],
        tally=Tally(),
        score=HeldOutScore(0),
        on_event=lambda _: None,
    )

    async def call() -> None:
        raise refusal

    asyncio.run(sync.retrying("submitting", call))


def test_run_finished_code_ends_the_peer_whatever_the_words() -> None:
    with pytest.raises(RunFinished):
        _retrying(AggregatorRefused("round 3 is still open", code=RefusalCode.RUN_FINISHED))


def test_words_alone_do_not_end_the_peer() -> None:
    with pytest.raises(AggregatorRefused):
        _retrying(AggregatorRefused("run 'x' has finished at round 3"))
