"""The round keeper with plain calls: which upload it accepts, refuses (and why), takes late, credits again,
and what closing a round leaves behind. No server, no streams, no network; time from a clock the test holds."""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from potluck.aggregator_server.accounting import open_ledger
from potluck.aggregator_server.checkpoint import load_spool
from potluck.aggregator_server.closed_rounds import ClosedRound, ClosedRounds
from potluck.aggregator_server.closing import RoundClose
from potluck.aggregator_server.keeper import RoundKeeper, Upload
from potluck.aggregator_server.master import initial_master, token_cap
from potluck.aggregator_server.reputation import Reputation
from potluck.aggregator_server.served_state import serve_state
from potluck.events import Event
from potluck.protocol.config import RunConfig
from potluck.protocol.envelope import SignedState, SignedUpdate, new_nonce, sign_update
from potluck.protocol.identity import Identity, generate_identity
from tests.integration.swarm_helpers import signed_test_update

AGGREGATOR = generate_identity()
PEER, OTHER = generate_identity(), generate_identity()
TOKENS = 4_000


class _Clock:
    """Unix time as the test says."""

    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s


def _keeper(tmp_path: Path, *, clock: Callable[[], float] = time.time, **overrides: Any) -> RoundKeeper:
    cfg = RunConfig().with_overrides({"rounds": 4, "data.max_bytes": 200_000, **overrides}, source="test")
    events: list[Event] = []
    return RoundKeeper(
        cfg,
        AGGREGATOR,
        initial_master(cfg),
        state_dir=tmp_path,
        ledger=open_ledger(tmp_path / "ledger.sqlite", identity=AGGREGATOR, round_index=0),
        reputation=Reputation.open(tmp_path, ban_after=cfg.validation.ban_after_rejections),
        scorer=None,
        on_event=events.append,
        clock=clock,
    )


def _state(keeper: RoundKeeper) -> tuple[SignedState, bytes]:
    served = serve_state(keeper.cfg, keeper.master, AGGREGATOR, shard=0)
    return SignedState.from_bytes(served.envelope), served.payload


def _upload(update: SignedUpdate, payload: bytes) -> Upload:
    return Upload(update=update, envelope=update.to_bytes(), payload=payload)


def _update(keeper: RoundKeeper, sender: Identity, *, seed: int = 0, density: float | None = None) -> Upload:
    return _upload(*signed_test_update(*_state(keeper), sender=sender, tokens=TOKENS, seed=seed, density=density))


def _resigned(upload: Upload, sender: Identity, **changes: Any) -> Upload:
    """The upload's header with `changes` (and a fresh nonce), signed by `sender`."""
    header = dataclasses.replace(upload.update.header, nonce=new_nonce(), **changes)
    return _upload(sign_update(header, sender), upload.payload)


def test_a_good_upload_is_accepted_spooled_and_credited_once_however_often_it_is_sent(tmp_path: Path) -> None:
    # Prepare
    keeper = _keeper(tmp_path)
    upload = _update(keeper, PEER)
    # Execute
    first, again = keeper.submit(upload), keeper.submit(upload)  # the second: a retry after a lost receipt
    # Assert
    assert first.accepted and first.credited == min(TOKENS, token_cap(keeper.cfg)) and first.round == 0
    assert first.changed and not again.changed
    assert again.accepted and again.credited == first.credited
    assert list(keeper.current.accepted) == [PEER.public_key] and keeper.current.rejected == 0
    assert len(load_spool(tmp_path, round=0, max_bytes=10**8)) == 1
    keeper.ledger.close()


def _forged(keeper: RoundKeeper) -> Upload:
    good = _update(keeper, PEER)
    return _upload(
        dataclasses.replace(good.update, signature=OTHER.sign(good.update.header.signed_bytes())), good.payload
    )


def _banned(keeper: RoundKeeper) -> Upload:
    keeper.ban(PEER.public_key, reason="test")
    return _update(keeper, PEER)


def _finished(keeper: RoundKeeper) -> Upload:
    keeper.finished = True
    return _update(keeper, PEER)


def _old(keeper: RoundKeeper) -> Upload:
    upload = _update(keeper, PEER)
    keeper.clock.now_s += keeper.cfg.validation.timestamp_window_s + 60  # type: ignore[attr-defined]
    return upload


def _copied(keeper: RoundKeeper) -> Upload:
    original = _update(keeper, OTHER)
    assert keeper.submit(original).accepted
    return _resigned(original, PEER, peer_public_key=PEER.public_key)


def _second(keeper: RoundKeeper) -> Upload:
    assert keeper.submit(_update(keeper, PEER, seed=1)).accepted
    return _update(keeper, PEER, seed=2)


REFUSALS = [
    (_forged, "signature", False, False),
    (_banned, "banned", False, False),
    (_finished, "finished", False, False),
    (_old, "freshness", True, False),
    (lambda k: _resigned(_update(k, PEER), PEER, round=2), "round", True, False),
    (lambda k: _resigned(_update(k, PEER), PEER, run_id="another"), "run", True, True),
    (lambda k: _resigned(_update(k, PEER), PEER, codec="int8"), "codec", True, True),
    (lambda k: _update(k, PEER, density=1 / 2), "decode", True, True),
    (_copied, "replay", True, True),
    (_second, "duplicate", True, True),
]


@pytest.mark.parametrize(("make", "check", "attributed", "strike"), REFUSALS)
def test_each_refusal_names_its_check_and_is_booked_as_the_check_says(
    tmp_path: Path, make: Callable[[RoundKeeper], Upload], check: str, attributed: bool, strike: bool
) -> None:
    """Only a validly signed refusal is a ledger row (`attributed`); only some checks are a strike (reputation.py)."""
    # Prepare: PEER is a member (an update of its was accepted in an earlier round)
    keeper = _keeper(tmp_path, clock=_Clock())
    keeper.members.add(PEER.public_key)
    upload = make(keeper)
    rejected_before = keeper.current.rejected
    # Execute
    decision = keeper.submit(upload)
    # Assert
    assert not decision.accepted and decision.credited == 0 and decision.rejection is not None
    assert decision.rejection.check == check, decision.rejection
    assert str(decision.rejection).startswith(f"{check}: ")
    assert PEER.public_key not in keeper.current.accepted or check == "duplicate"
    assert keeper.current.rejected == rejected_before + 1
    assert any(e.peer_public_key == PEER.public_key for e in keeper.current.refused) == attributed
    assert bool(keeper.reputation.strikes.get(PEER.public_key)) == strike
    keeper.ledger.close()


@pytest.mark.parametrize(("make", "check"), [(make, check) for make, check, _, _ in REFUSALS if check != "duplicate"])
def test_a_key_with_no_accepted_update_is_refused_without_a_record(
    tmp_path: Path, make: Callable[[RoundKeeper], Upload], check: str
) -> None:
    """Anyone can sign each upload with a fresh key: a stranger's refusal is no ledger row and no strike."""
    # Prepare
    keeper = _keeper(tmp_path, clock=_Clock())
    upload = make(keeper)
    # Execute
    decision = keeper.submit(upload)
    # Assert
    assert decision.rejection is not None and decision.rejection.check == check
    assert keeper.current.refused == [] and keeper.current.answered == {}
    assert PEER.public_key not in keeper.reputation.strikes
    keeper.ledger.close()


def test_the_ledgers_accepted_keys_are_members_after_a_restart(tmp_path: Path) -> None:
    # Prepare: round 0 closes with PEER's update
    keeper = _keeper(tmp_path)
    assert keeper.submit(_update(keeper, PEER)).accepted
    assert isinstance(keeper.close("all-reported"), RoundClose)
    keeper.ledger.close()
    # Execute
    restarted = _keeper(tmp_path)
    # Assert
    assert restarted.members.keys == {PEER.public_key}
    restarted.ledger.close()


def test_a_standby_taking_over_counts_the_primarys_last_contributors_as_members(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)

    keeper.take_over(keeper.master, {PEER.public_key})

    assert PEER.public_key in keeper.members and OTHER.public_key not in keeper.members
    keeper.ledger.close()


def test_a_refused_update_sent_again_gets_the_same_answer_without_a_second_strike(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    keeper.members.add(PEER.public_key)
    wrong = _resigned(_update(keeper, PEER), PEER, codec="int8")

    answers = [keeper.submit(wrong) for _ in range(3)]

    assert {(a.accepted, str(a.rejection)) for a in answers} == {(False, str(answers[0].rejection))}
    assert keeper.reputation.strikes[PEER.public_key] == [0] and keeper.current.rejected == 1
    keeper.ledger.close()


def test_a_late_update_counts_in_the_open_round_at_the_discount(tmp_path: Path) -> None:
    # Prepare: round 0 closes with PEER's update; OTHER's round-0 update is still on its way
    keeper = _keeper(tmp_path, late_updates="discount", late_discount=0.5)
    late = _update(keeper, OTHER, seed=1)
    assert keeper.submit(_update(keeper, PEER)).accepted
    assert isinstance(keeper.close("deadline"), RoundClose)
    # Execute
    decision = keeper.submit(late)
    # Assert
    assert decision.accepted and decision.late and decision.round == 1 and decision.credited == TOKENS // 2
    assert keeper.current.accepted[OTHER.public_key].discount == 0.5
    keeper.ledger.close()


def test_closing_a_round_records_it_opens_the_next_and_still_credits_a_retry_of_its_updates(tmp_path: Path) -> None:
    # Prepare
    keeper = _keeper(tmp_path)
    uploads = [_update(keeper, peer, seed=i) for i, peer in enumerate((PEER, OTHER))]
    for upload in uploads:
        assert keeper.submit(upload).accepted
    # Execute
    closed = keeper.close("all-reported")
    retried = keeper.submit(uploads[0])  # its receipt was lost while the round closed
    # Assert
    assert isinstance(closed, RoundClose) and closed.reason == "all-reported"
    assert (keeper.master.round, keeper.current.index, keeper.rounds_closed) == (1, 1, 1)
    assert keeper.current.expected == {PEER.public_key, OTHER.public_key}  # the next round waits for both
    assert keeper.closed.get(0) is closed.record and closed.record.aggregate
    assert set(closed.record.credited) == {u.update.header.digest() for u in uploads}
    assert closed.record.rows is not None and len(closed.record.rows) == 2
    assert [h.round for h in keeper.ledger.heads()] == [0] and closed.head.round == 0
    assert dict(closed.signed.header.contributors) == {
        u.update.header.peer_public_key: closed.record.credited[u.update.header.digest()] for u in uploads
    }
    assert (
        retried.accepted
        and retried.round == 0
        and retried.credited == closed.record.credited[uploads[0].update.header.digest()]
    )
    keeper.ledger.close()


def test_the_window_keeps_the_last_rounds_and_forgets_older_ones_in_one_prune() -> None:
    window = ClosedRounds(kept=3)

    for index in range(5):
        window.add(ClosedRound(index=index, aggregate=b"a%d" % index, nonces={b"n%d" % index: b"d%d" % index}))

    assert list(window) == [2, 3, 4] and 1 not in window
    assert window.aggregate(1) is None and window.aggregate(4) == b"a4"
    assert window.nonces() == {b"n2": b"d2", b"n3": b"d3", b"n4": b"d4"}
