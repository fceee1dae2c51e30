"""Whom a round waits for: keys that did work lately, never keys that only asked (attendance.py, via the keeper)."""

from pathlib import Path

from potluck.aggregator_server.attendance import MAX_MISSES, RECENT_ROUNDS, STARTUP_ROUNDS, Attendance
from potluck.aggregator_server.closing import RoundClose
from potluck.aggregator_server.keeper import RoundKeeper
from potluck.protocol.identity import Identity, generate_identity
from tests.aggregator_server.test_keeper import OTHER, PEER, _keeper, _resigned, _update

STRANGER = generate_identity()


def _round_with(keeper: RoundKeeper, *senders: Identity, reason: str = "all-reported") -> None:
    """Each sender's update accepted into the open round, then the round closed."""
    for i, sender in enumerate(senders):
        assert keeper.submit(_update(keeper, sender, seed=keeper.current.index * 10 + i)).accepted
    assert isinstance(keeper.close(reason), RoundClose)


def test_a_key_that_only_asks_for_the_state_is_never_waited_for(tmp_path: Path) -> None:
    # Prepare: a run under way (past its start-up rounds), PEER and OTHER its members
    keeper = _keeper(tmp_path, rounds=8)
    for member in (PEER, OTHER):
        keeper.join(member.public_key, wait_for_peers=0)
    for _ in range(STARTUP_ROUNDS):
        _round_with(keeper, PEER, OTHER)
    # Execute: a stranger asks for the manifest, again and again, under its key
    for _ in range(3):
        keeper.join(STRANGER.public_key, wait_for_peers=0)
    for i, member in enumerate((PEER, OTHER)):
        assert keeper.submit(_update(keeper, member, seed=50 + i)).accepted
    # Assert: the round closes when its members reported, and the next does not wait for the stranger either
    assert STRANGER.public_key not in keeper.current.expected
    assert keeper.current.close_reason() == "all-reported"
    assert isinstance(keeper.close("all-reported"), RoundClose)
    assert keeper.current.expected == {PEER.public_key, OTHER.public_key}
    keeper.ledger.close()


def test_the_first_rounds_of_a_fresh_run_wait_for_their_joiners(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)

    keeper.join(PEER.public_key, wait_for_peers=0)
    _round_with(keeper, PEER)
    keeper.join(OTHER.public_key, wait_for_peers=0)  # too slow for the first round: the second waits for it

    assert keeper.current.index == 1 < STARTUP_ROUNDS
    assert keeper.current.expected == {PEER.public_key, OTHER.public_key}
    assert keeper.submit(_update(keeper, PEER, seed=7)).accepted
    assert keeper.current.close_reason() is None  # OTHER has not reported
    keeper.ledger.close()


def test_a_member_that_misses_rounds_drops_out_and_is_back_when_it_delivers(tmp_path: Path) -> None:
    # Prepare: both members after round 0
    keeper = _keeper(tmp_path, rounds=8)
    for member in (PEER, OTHER):
        keeper.join(member.public_key, wait_for_peers=0)
    _round_with(keeper, PEER, OTHER)
    # Execute: OTHER misses round 1 (waited for: the round closes at its deadline)
    assert keeper.submit(_update(keeper, PEER, seed=11)).accepted
    assert keeper.current.close_reason(now=keeper.current.opened_at) is None  # still waiting for OTHER
    assert isinstance(keeper.close("deadline"), RoundClose)
    # Assert: round 2 no longer waits for it...
    assert keeper.current.expected == {PEER.public_key}
    assert keeper.submit(_update(keeper, PEER, seed=21)).accepted
    assert keeper.current.close_reason(now=keeper.current.opened_at) == "all-reported"
    # ...until it delivers again: its update in time is accepted, and round 3 waits for it
    assert keeper.submit(_update(keeper, OTHER, seed=22)).accepted
    assert isinstance(keeper.close("all-reported"), RoundClose)
    assert keeper.current.expected == {PEER.public_key, OTHER.public_key}
    keeper.ledger.close()


def test_a_late_stranger_is_only_a_newcomer_but_a_late_member_is_waited_for_again(tmp_path: Path) -> None:
    # Prepare: PEER and OTHER members; PEER misses round 1; STRANGER never had an update kept
    keeper = _keeper(tmp_path, rounds=8)
    for member in (PEER, OTHER):
        keeper.join(member.public_key, wait_for_peers=0)
    _round_with(keeper, PEER, OTHER)
    late = _update(keeper, PEER, seed=5)  # made for round 1, to come late in round 2
    _round_with(keeper, OTHER, reason="deadline")
    assert keeper.current.expected == {OTHER.public_key}
    stale = _resigned(late, STRANGER, peer_public_key=STRANGER.public_key)
    # Execute: both send an update for the round before, during round 2
    refused = [keeper.submit(stale), keeper.submit(late)]
    # Assert: the member is waited for again (it trains this round now), the stranger only as a newcomer, once
    assert [d.rejection.check for d in refused if d.rejection is not None] == ["round", "round"]
    assert keeper.current.expected == {PEER.public_key, OTHER.public_key}
    assert keeper.current.newcomers == {STRANGER.public_key}
    assert not keeper.attendance.welcome(STRANGER.public_key)
    keeper.ledger.close()


def test_a_signed_update_for_a_later_round_is_a_report_in_the_first_round_too(tmp_path: Path) -> None:
    # Prepare: a fresh run's first round waits for both joiners
    keeper = _keeper(tmp_path)
    for member in (PEER, OTHER):
        keeper.join(member.public_key, wait_for_peers=0)
    assert keeper.submit(_update(keeper, PEER)).accepted
    # Execute: OTHER signs its update for round 1, not 0 (as the red team's "stale" peer does)
    refused = keeper.submit(_resigned(_update(keeper, OTHER, seed=3), OTHER, round=1))
    # Assert: refused, and the round does not wait for it any longer
    assert refused.rejection is not None and refused.rejection.check == "round"
    assert keeper.current.close_reason() == "all-reported"
    keeper.ledger.close()


def test_a_key_whose_update_the_checks_dropped_is_a_newcomer_in_the_next_round(tmp_path: Path) -> None:
    # Prepare: the first round, whose checks drop OTHER's update at close (as closing.py books it)
    keeper = _keeper(tmp_path)
    for member in (PEER, OTHER):
        keeper.join(member.public_key, wait_for_peers=0)
    assert keeper.submit(_update(keeper, PEER)).accepted
    keeper.current.reported.add(OTHER.public_key)
    keeper.current.dropped.add(OTHER.public_key)
    # Execute
    assert isinstance(keeper.close("all-reported"), RoundClose)
    # Assert: no member, but waited for a little in the next round
    assert keeper.current.expected == {PEER.public_key}
    assert keeper.current.newcomers == {OTHER.public_key}
    keeper.ledger.close()


def test_attendance_counts_misses_and_forgets_old_members() -> None:
    a = Attendance()
    a.round_closed(0, waited=set(), reported=set(), kept={b"p", b"q"})
    assert a.expected(1) == {b"p", b"q"}

    for r in range(1, 1 + MAX_MISSES):
        a.round_closed(r, waited=a.expected(r), reported=set(), kept={b"p"})
    assert a.expected(1 + MAX_MISSES) == {b"p"}  # q ran out of misses
    assert a.may_wait_late(b"q", 1 + MAX_MISSES)  # one more chance, for a late update of it

    last = 1 + MAX_MISSES + RECENT_ROUNDS
    for r in range(1 + MAX_MISSES, last + 1):
        a.round_closed(r, waited=a.expected(r), reported=set(), kept={b"p"})
    assert set(a.kept) == {b"p"}  # q is forgotten
    assert not a.may_wait_late(b"q", last + 1)
