"""Whose holder records a joiner believes: the contributors the aggregator signed for the state's round, and no one
else, whatever the aggregator link does."""

import asyncio
from typing import Any

from potluck.peer.holder_trust import state_members
from potluck.protocol.client import AggregatorUnreachable, Transfer
from potluck.protocol.envelope import SignedAggregate, sign_aggregate
from potluck.protocol.identity import generate_identity
from tests.protocol.test_envelope import AGGREGATOR, PEER, _aggregate_header, _state_header

STANDBY = generate_identity()


class _Link:
    """An aggregator link that answers fetch_aggregate with `aggregate` (or raises it)."""

    def __init__(self, aggregate: SignedAggregate | Exception) -> None:
        self.aggregate = aggregate
        self.asked: list[int] = []

    async def fetch_aggregate(self, round_index: int, *, timeout_s: float) -> tuple[SignedAggregate, bytes, Any]:
        self.asked.append(round_index)
        if isinstance(self.aggregate, Exception):
            raise self.aggregate
        return self.aggregate, b"", Transfer(body=b"x" * 100, sent_bytes=10, wait_s=0.0, transfer_s=0.0)


def _members(link: _Link, **state: Any) -> Any:
    header = _state_header(**state)
    return asyncio.run(state_members(link, header, aggregators=[STANDBY.public_key]))  # type: ignore[arg-type]


def test_the_contributors_of_the_round_that_made_the_state_are_members() -> None:
    link = _Link(sign_aggregate(_aggregate_header(round=7, new_version=8), AGGREGATOR))

    members = _members(link, round=8, new_version=8)

    assert link.asked == [7]
    assert members.keys == {PEER.public_key, b"\x07" * 32, AGGREGATOR.public_key, STANDBY.public_key}
    assert members.bytes_down == 110
    assert members.contributors == 2  # the aggregate's count: where the holders' records are (holder_records.py)


def test_an_aggregate_signed_by_another_key_or_for_another_state_names_no_member() -> None:
    forged = _Link(sign_aggregate(_aggregate_header(new_version=8, aggregator_public_key=PEER.public_key), PEER))
    other = _Link(sign_aggregate(_aggregate_header(round=7, new_version=5), AGGREGATOR))
    gone = _Link(AggregatorUnreachable("no reply within 20 s"))

    found = [_members(link, round=8, new_version=8).keys for link in (forged, other, gone)]

    assert found == [{AGGREGATOR.public_key, STANDBY.public_key}] * 3


def test_before_any_round_closed_only_the_aggregators_hold_the_state() -> None:
    link = _Link(AggregatorUnreachable("not asked"))

    members = _members(link, round=0, new_version=0)

    assert link.asked == [] and members.keys == {AGGREGATOR.public_key, STANDBY.public_key}
