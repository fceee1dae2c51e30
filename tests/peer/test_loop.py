"""The verdict on a peer's update of a round, shard by shard: counted, refused on arrival, dropped at close, late."""

from types import SimpleNamespace

import pytest

from potluck.peer.loop import Sent, ShardRound, judge

ME, OTHER = b"\x01" * 32, b"\x02" * 32
ROUND = 5


def _part(*, accepted: bool = True, counts_in: int = ROUND, listed: bool = True, reason: str = "") -> ShardRound:
    """One shard's part of round ROUND: the receipt on arrival says `accepted`/`counts_in`, the aggregate lists ME."""
    receipt = SimpleNamespace(receipt=SimpleNamespace(accepted=accepted, round=counts_in, reason=reason))
    sent = Sent(
        shard=None,  # type: ignore[arg-type]  # the verdict reads the receipt and the aggregate only
        codec=None,  # type: ignore[arg-type]
        work=None,  # type: ignore[arg-type]
        update=None,  # type: ignore[arg-type]
        payload=b"",
        receipt=receipt,  # type: ignore[arg-type]
        transfer=None,  # type: ignore[arg-type]
    )
    contributors = ((ME, 1), (OTHER, 1)) if listed else ((OTHER, 1),)
    aggregate = SimpleNamespace(header=SimpleNamespace(contributors=contributors))
    return ShardRound(sent=sent, aggregate=aggregate, payload=b"", transfer=None)  # type: ignore[arg-type]


def test_an_update_received_and_listed_in_every_shard_counts() -> None:
    verdict = judge(ROUND, [_part(), _part()], public_key=ME)

    assert (verdict.accepted, verdict.reason, verdict.late, verdict.dropped) == (True, "", False, False)


def test_an_update_received_but_left_out_of_one_shards_list_was_dropped_at_round_close() -> None:
    verdict = judge(ROUND, [_part(), _part(listed=False)], public_key=ME)

    assert not verdict.accepted and verdict.dropped and not verdict.late
    assert verdict.reason.startswith("dropped at round close")


def test_refusals_on_arrival_give_their_reasons_once_each() -> None:
    refused = [_part(accepted=False, reason="too large"), _part(accepted=False, reason="too large")]

    verdict = judge(ROUND, [*refused, _part(accepted=False, reason="stale base")], public_key=ME)

    assert (verdict.accepted, verdict.dropped, verdict.late) == (False, False, False)
    assert verdict.reason == "too large; stale base"


@pytest.mark.parametrize("listed", [True, False])
def test_an_update_accepted_into_the_next_round_is_late_whatever_this_rounds_list_says(listed: bool) -> None:
    verdict = judge(ROUND, [_part(counts_in=ROUND + 1, listed=listed)], public_key=ME)

    assert verdict.late and not verdict.accepted and not verdict.dropped
    assert verdict.reason == f"late: it counts in round {ROUND + 1} at the run's discount"
