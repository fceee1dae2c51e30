"""Tests for potluck.aggregator_server.rounds: when a round closes and whom the next one waits for."""

import hashlib
import time

import pytest

from potluck.aggregator_server.rounds import Accepted, OpenRound
from potluck.protocol.envelope import UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity, generate_identity

PEERS = [generate_identity() for _ in range(3)]
PAYLOAD = b"payload"
OPENED_AT = 1_000.0
DEADLINE_S = 60.0


def _accepted(peer: Identity, *, tokens: int) -> Accepted:
    header = UpdateHeader(
        run_id="rounds-test",
        config_hash=hashlib.sha256(b"config").hexdigest(),
        round=4,
        base_version=4,
        peer_public_key=peer.public_key,
        tokens=tokens,
        inner_steps=10,
        codec="none",
        payload_bytes=len(PAYLOAD),
        payload_sha256=payload_digest(PAYLOAD),
        nonce=new_nonce(),
        timestamp_s=1_700_000_000.0,
    )
    update = sign_update(header, peer)
    return Accepted(update=update, envelope=update.to_bytes(), payload=PAYLOAD, decoded={}, weight=float(tokens))


def _round(*, target_tokens: int | None = None, expected: set[bytes] | None = None) -> OpenRound:
    return OpenRound(
        index=4, deadline_s=DEADLINE_S, target_tokens=target_tokens, expected=expected or set(), opened_at=OPENED_AT
    )


def _accept(open_round: OpenRound, peer: Identity, *, tokens: int = 100) -> None:
    open_round.accepted[peer.public_key] = _accepted(peer, tokens=tokens)


@pytest.mark.parametrize("now", [OPENED_AT, OPENED_AT + DEADLINE_S, OPENED_AT + 100 * DEADLINE_S])
def test_a_round_without_updates_never_closes(now: float) -> None:
    # Prepare: a token target of one and every expected peer "reported" vacuously
    open_round = _round(target_tokens=1)
    # Execute / Assert
    assert open_round.close_reason(now=now) is None


def test_a_round_closes_at_the_token_target() -> None:
    # Prepare
    open_round = _round(target_tokens=250, expected={p.public_key for p in PEERS})
    _accept(open_round, PEERS[0], tokens=100)
    _accept(open_round, PEERS[1], tokens=100)
    assert open_round.close_reason(now=OPENED_AT) is None
    # Execute
    _accept(open_round, PEERS[2], tokens=50)
    # Assert: both reasons hold; the token target is reported first
    assert open_round.tokens == 250
    assert open_round.close_reason(now=OPENED_AT) == "tokens"


def test_a_round_closes_when_every_expected_peer_reported() -> None:
    open_round = _round(target_tokens=10**9, expected={PEERS[0].public_key, PEERS[1].public_key})
    _accept(open_round, PEERS[0])
    assert open_round.close_reason(now=OPENED_AT + 1) is None

    _accept(open_round, PEERS[1])

    assert open_round.close_reason(now=OPENED_AT + 1) == "all-reported"


def test_an_unexpected_extra_reporter_does_not_stop_the_wait_for_an_expected_one() -> None:
    open_round = _round(expected={PEERS[0].public_key})

    _accept(open_round, PEERS[1])

    assert open_round.close_reason(now=OPENED_AT + 1) is None


def test_a_round_expecting_nobody_waits_for_the_deadline() -> None:
    # Prepare: an empty expected set must not count as "everyone reported"
    open_round = _round()
    _accept(open_round, PEERS[0])
    # Execute / Assert
    assert open_round.close_reason(now=OPENED_AT + DEADLINE_S - 0.001) is None
    assert open_round.close_reason(now=OPENED_AT + DEADLINE_S) == "deadline"
    assert open_round.close_reason(now=OPENED_AT + 2 * DEADLINE_S) == "deadline"


def test_seconds_left_counts_down_from_the_opening() -> None:
    open_round = _round()

    assert open_round.seconds_left(now=OPENED_AT + 15) == DEADLINE_S - 15
    assert open_round.seconds_left(now=OPENED_AT + DEADLINE_S + 5) == -5


def test_extend_gives_another_full_deadline() -> None:
    # Prepare: a round whose deadline passed with no update (on the real clock: a fresh machine's is small)
    open_round = _round()
    open_round.opened_at = time.monotonic() - 2 * DEADLINE_S
    assert open_round.seconds_left() < 0
    # Execute
    open_round.extend()
    # Assert
    assert DEADLINE_S - 5 < open_round.seconds_left() <= DEADLINE_S
    _accept(open_round, PEERS[0])
    assert open_round.close_reason() is None


def test_the_successor_waits_for_whom_it_is_told_and_starts_empty() -> None:
    # Prepare
    open_round = _round(target_tokens=500, expected={PEERS[0].public_key})
    _accept(open_round, PEERS[0])
    open_round.join(PEERS[2].public_key)
    # Execute
    following = open_round.successor(expected={PEERS[1].public_key})
    # Assert
    assert following.index == 5
    assert following.deadline_s == DEADLINE_S
    assert following.target_tokens == 500
    assert following.expected == {PEERS[1].public_key}
    assert following.accepted == {}
    assert following.joined == set()
    assert following.rejected == 0


def test_a_joiner_is_remembered_but_not_waited_for() -> None:
    open_round = _round(expected={PEERS[0].public_key})
    _accept(open_round, PEERS[0])

    open_round.join(PEERS[1].public_key)

    assert open_round.joined == {PEERS[1].public_key}
    assert open_round.close_reason(now=OPENED_AT) == "all-reported"


def test_a_peer_whose_update_was_rejected_has_reported_too() -> None:
    open_round = _round(expected={PEERS[0].public_key, PEERS[1].public_key})
    _accept(open_round, PEERS[0])
    assert open_round.close_reason(now=OPENED_AT + 1) is None

    open_round.reported.add(PEERS[1].public_key)  # its signed update failed a check

    assert open_round.close_reason(now=OPENED_AT + 1) == "all-reported"


def test_a_newcomer_is_waited_for_no_longer_than_the_members_took() -> None:
    # Prepare: the member reports 3 s into the round; a newcomer is still to come
    open_round = _round(expected={PEERS[0].public_key})
    open_round.newcomers.add(PEERS[1].public_key)
    _accept(open_round, PEERS[0])
    # Execute / Assert
    assert open_round.close_reason(now=OPENED_AT + 3) is None  # the members are in: the newcomer's grace starts
    assert open_round.close_reason(now=OPENED_AT + 5) is None
    assert open_round.close_reason(now=OPENED_AT + 6) == "all-reported"  # as long again as the members took
    open_round.members_in_at = None
    open_round.reported.add(PEERS[1].public_key)
    assert open_round.close_reason(now=OPENED_AT + 3) == "all-reported"  # or as soon as it reports
