"""RunStatus folds the aggregator's events into the numbers the status page shows."""

import dataclasses
import json
import threading

import pytest

from potluck.events import AggregatorDone, Event, Joined, RoundError, StatusPage, Unbanned
from potluck.web import RunStatus
from potluck.web.status import MAX_CHECKS, MAX_LOSS_POINTS, MAX_PEERS, MAX_REJECTIONS, MAX_ROUNDS, MAX_TEXT_CHARS
from tests.web.conftest import FakeClock
from tests.web.events import (
    AGGREGATOR,
    ALICE,
    BOB,
    KEYS,
    MADDR,
    MALLORY,
    T0_S,
    closed,
    head,
    peer_round,
    ready,
    received,
    rejected,
    round_open,
)


def test_a_status_before_any_event_is_starting_and_empty() -> None:
    # Prepare
    status = RunStatus()
    # Execute
    s = status.status()
    # Assert
    assert s["phase"] == "starting"
    assert s["round"] is None and s["run"] is None and s["join_command"] is None
    assert s["loss_history"] == [] and s["peers_active"] == 0
    assert status.peers() == [] and status.rounds() == [] and status.leaderboard() == []
    assert status.ledger_head() is None and status.rejections() == []


def test_ready_describes_the_run_and_how_to_join() -> None:
    # Prepare
    status = RunStatus()
    # Execute
    status.handle(ready())
    s = status.status()
    # Assert
    assert s["run"] == "tiny-stdlib" and s["fingerprint"] == AGGREGATOR and s["config_hash"] == "c0" * 32
    assert (s["model"], s["num_params"], s["codec"], s["aggregate_codec"]) == (
        "gpt-tiny",
        1_234_567,
        "topk-int8",
        "int8",
    )
    assert (s["phase"], s["round"], s["rounds_total"], s["round_deadline_s"]) == ("collecting", 0, 100, 60.0)
    assert s["loss_history"] == [{"round": -1, "val_loss": 5.5}]
    assert s["join_command"] == f"peer --join {MADDR}"
    assert status.leaderboard() == [
        {"rank": 1, "fingerprint": ALICE, "public_key": KEYS[ALICE], "points": 10.0, "accepted": 2}
    ]


def test_a_resumed_run_starts_its_curve_at_the_last_closed_round() -> None:
    # Prepare
    status = RunStatus()
    # Execute
    status.handle(ready(round=7, resumed=True, val_loss=3.25))
    # Assert
    assert status.status()["loss_history"] == [{"round": 6, "val_loss": 3.25}]
    assert status.status()["resumed"] is True


def test_closed_rounds_give_the_loss_curve_throughput_and_traffic(run_status: RunStatus) -> None:
    # Execute
    s = run_status.status()
    # Assert
    assert s["round"] == 2 and s["rounds_closed"] == 2 and s["phase"] == "collecting"
    assert s["loss_history"] == [
        {"round": -1, "val_loss": 5.5},
        {"round": 0, "val_loss": 5.0},
        {"round": 1, "val_loss": 4.5},
    ]
    assert s["val_loss"] == 4.5
    assert s["tokens_per_s"] == pytest.approx(4096 / 50.0)
    assert s["tokens_per_s_recent"] == pytest.approx((2 * 4096 + 4096) / (40.0 + 50.0))
    assert s["round_s"] == 50.0
    assert (s["bytes_in"], s["bytes_out"]) == (200_000, 600_000)
    assert (s["updates_accepted"], s["updates_rejected"], s["rejected_by_check"]) == (3, 1, {"norm": 1})
    assert (s["peers_active"], s["peers_known"], s["peers_banned"]) == (2, 3, 1)
    assert s["state_sha256"] == "01" * 32
    json.dumps(s, allow_nan=False)  # what the API serves must be plain JSON


def test_the_countdown_follows_the_clock_and_stops_when_the_round_closes(
    run_status: RunStatus, clock: FakeClock
) -> None:
    # Prepare: round 2 opened at T0_S + 120 with a 60 s deadline; the clock reads T0_S + 130.
    before = run_status.status()["seconds_to_deadline"]
    # Execute
    clock.now_s = T0_S + 175.5
    near = run_status.status()["seconds_to_deadline"]
    clock.now_s = T0_S + 500.0
    late = run_status.status()["seconds_to_deadline"]
    run_status.handle(closed(2, accepted=[ALICE], val_loss=4.4))
    after_close = run_status.status()["seconds_to_deadline"]
    # Assert
    assert before == pytest.approx(50.0)
    assert near == pytest.approx(4.5)
    assert late == 0.0
    assert after_close is None


def test_a_close_that_arrives_after_the_next_rounds_open_keeps_its_countdown(clock: FakeClock) -> None:
    # Prepare: round 0 closes, but round 1's open event is folded before round 0's close event.
    status = RunStatus(clock=clock)
    status.handle(ready())
    status.handle(round_open(0))
    status.handle(round_open(1))
    clock.now_s = T0_S + 70.0  # 10 s into round 1
    # Execute
    status.handle(closed(0, accepted=[ALICE], val_loss=5.0))
    # Assert
    s = status.status()
    assert (s["phase"], s["round"], s["rounds_closed"]) == ("collecting", 1, 1)
    assert s["seconds_to_deadline"] == pytest.approx(50.0)
    assert s["round_deadline_s"] == 60.0


def test_peers_show_activity_verdicts_last_rejection_and_bans(run_status: RunStatus) -> None:
    # Prepare: one more round without BOB makes him idle (his last upload is three rounds back).
    run_status.handle(received(ALICE, 2))
    run_status.handle(closed(2, accepted=[ALICE], val_loss=4.4))
    run_status.handle(round_open(3))
    # Execute
    peers = {p["fingerprint"]: p for p in run_status.peers()}
    # Assert
    alice, bob, mallory = peers[ALICE], peers[BOB], peers[MALLORY]
    assert (alice["status"], alice["rounds_contributed"], alice["accepted"], alice["rejected"]) == ("active", 3, 3, 0)
    assert alice["uploads"] == 3 and alice["bytes_received"] == 150_000 and alice["last_round"] == 2
    assert alice["tokens_per_s"] == pytest.approx(4096 / 40.0)
    assert alice["last_seen_s"] == T0_S + 120 + 40.0
    assert alice["points"] == 10.0 + 3 * 4.0
    assert alice["last_rejection"] is None and alice["client_mode"] is None
    assert (bob["status"], bob["accepted"], bob["last_round"]) == ("idle", 1, 0)
    assert mallory["status"] == "banned" and mallory["banned"] and mallory["ban_reason"] == "3 strikes (norm)"
    assert (mallory["accepted"], mallory["rejected"], mallory["points"]) == (0, 1, None)
    assert mallory["last_rejection"] == {"round": 1, "check": "norm", "reason": "update norm 1e9 over 10x the median"}
    assert [p["fingerprint"] for p in run_status.peers(limit=1)] == [ALICE]  # most recently seen first


def test_a_peers_client_mode_is_what_it_said_when_it_joined(run_status: RunStatus) -> None:
    # Execute: ALICE downloads the state again, saying she dials out only; a stranger joins and never uploads
    run_status.handle(Joined(fingerprint=ALICE, client_mode=True, round=2, time_s=T0_S))
    run_status.handle(Joined(fingerprint="pl-stranger", client_mode=False, round=2, time_s=T0_S))
    # Assert
    peers = {p["fingerprint"]: p for p in run_status.peers()}
    assert peers[ALICE]["client_mode"] == "client" and peers[BOB]["client_mode"] is None
    assert "pl-stranger" not in peers  # an unproven key is not a peer until it uploads


def test_an_unbanned_peer_is_no_longer_shown_banned(run_status: RunStatus) -> None:
    # Execute
    run_status.handle(Unbanned(fingerprint=MALLORY))
    # Assert
    mallory = next(p for p in run_status.peers() if p["fingerprint"] == MALLORY)
    assert not mallory["banned"] and mallory["status"] == "active"


def test_rounds_are_summarised_newest_first(run_status: RunStatus) -> None:
    # Execute
    rounds = run_status.rounds()
    # Assert
    assert [r["round"] for r in rounds] == [1, 0]
    assert rounds[0] == {
        "round": 1,
        "closed_by": "all-reported",
        "val_loss": 4.5,
        "accepted": 1,
        "rejected": 1,
        "tokens": 4096,
        "tokens_per_s": pytest.approx(4096 / 50.0),
        "round_s": 50.0,
        "aggregation_s": 0.5,
        "aggregate_bytes": 80_000,
        "state_sha256": "01" * 32,
        "time_s": T0_S + 60 + 50.0,
    }
    assert [r["round"] for r in run_status.rounds(limit=1)] == [1]


def test_the_leaderboard_grows_by_each_rounds_credits(run_status: RunStatus) -> None:
    # Execute
    board = run_status.leaderboard()
    # Assert
    assert board == [
        {"rank": 1, "fingerprint": ALICE, "public_key": KEYS[ALICE], "points": 18.0, "accepted": 4},
        {"rank": 2, "fingerprint": BOB, "public_key": KEYS[BOB], "points": 4.0, "accepted": 1},
    ]


def test_the_ledger_head_is_the_latest_one_reported(run_status: RunStatus) -> None:
    # Prepare
    fresh = RunStatus()
    fresh.handle(ready())
    # Execute
    latest = run_status.ledger_head()
    # Assert
    assert fresh.ledger_head() is None
    assert latest == dataclasses.asdict(head(1))


def test_rejections_are_listed_newest_first(run_status: RunStatus, clock: FakeClock) -> None:
    # Prepare
    clock.now_s = T0_S + 140.0
    run_status.handle(rejected(BOB, 2, check="stale", reason="built on round 0"))
    # Execute
    rejections = run_status.rejections()
    # Assert
    assert [(r["fingerprint"], r["check"], r["round"]) for r in rejections] == [
        (BOB, "stale", 2),
        (MALLORY, "norm", 1),
    ]
    assert rejections[0] == {
        "round": 2,
        "fingerprint": BOB,
        "check": "stale",
        "reason": "built on round 0",
        "update": "ab" * 8,
        "time_s": T0_S + 140.0,
    }
    assert len(run_status.rejections(limit=1)) == 1


def test_the_run_is_finished_after_its_last_round_or_when_done() -> None:
    # Prepare
    last = RunStatus()
    last.handle(ready(rounds_total=1))
    stopped = RunStatus()
    stopped.handle(ready())
    # Execute
    last.handle(closed(0, accepted=[ALICE], val_loss=5.0))
    stopped.handle(AggregatorDone(round=0, rounds_closed=0))
    # Assert
    assert last.status()["phase"] == "finished" and last.status()["round"] == 1
    assert stopped.status()["phase"] == "finished" and stopped.status()["seconds_to_deadline"] is None


def test_an_error_is_shown_until_the_next_one(run_status: RunStatus, clock: FakeClock) -> None:
    # Execute
    run_status.handle(RoundError(round=2, detail="checkpoint: disk full"))
    # Assert
    assert run_status.status()["last_error"] == {"round": 2, "detail": "checkpoint: disk full", "time_s": clock.now_s}


@pytest.mark.parametrize(
    "event",
    [
        peer_round(3),  # a peer's event: not the aggregator's to fold
        StatusPage(url="http://127.0.0.1:8000"),
        dataclasses.replace(closed(2, accepted=[ALICE], val_loss=5.0), val_loss=float("nan"), round_s=float("inf")),
        dataclasses.replace(round_open(2), deadline_s=float("nan"), time_s=float("-inf")),
        ready(val_loss=float("nan"), round_deadline_s=float("inf")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_kinds_and_non_finite_numbers_keep_the_page_serveable(run_status: RunStatus, event: Event) -> None:
    # Execute
    run_status.handle(event)
    # Assert
    for snapshot in (run_status.status(), run_status.peers(), run_status.rounds(), run_status.leaderboard()):
        json.dumps(snapshot, allow_nan=False)
    assert all(isinstance(p["val_loss"], float) for p in run_status.status()["loss_history"])


def test_a_fold_that_fails_is_logged_and_never_raises(run_status: RunStatus, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a round whose accepted list holds something no node sends
    broken = dataclasses.replace(closed(2, accepted=[ALICE], val_loss=5.0), accepted=(None,))  # type: ignore[arg-type]
    # Execute
    run_status.handle(broken)
    # Assert
    assert "could not fold" in caplog.text
    json.dumps(run_status.status(), allow_nan=False)


def test_hostile_strings_are_kept_as_data_and_cut_to_size() -> None:
    # Prepare
    status = RunStatus()
    status.handle(ready())
    who = '<img src=x onerror="alert(1)">'
    reason = "<script>fetch('//evil')</script>" + "x" * 1_000_000
    # Execute
    status.handle(received(who, 0))
    status.handle(rejected(who, 0, check="<b>", reason=reason))
    # Assert
    peer = status.peers()[0]
    assert peer["fingerprint"] == who
    assert peer["last_rejection"]["reason"] == reason[:MAX_TEXT_CHARS]
    assert status.rejections()[0]["check"] == "<b>"


def test_every_kept_list_stays_bounded_under_a_flood() -> None:
    # Prepare
    status = RunStatus()
    status.handle(ready())
    flood = MAX_PEERS + 500
    # Execute
    for i in range(flood):
        status.handle(received(f"pl-flood-{i}", 0))
    for i in range(MAX_REJECTIONS + 50):
        status.handle(rejected(f"pl-flood-{i}", 0, check=f"check-{i}"))
    for r in range(MAX_ROUNDS + 100):
        status.handle(closed(r, accepted=[], val_loss=5.0 - r / 10_000))
    # Assert
    s = status.status()
    assert s["peers_known"] == MAX_PEERS
    assert len(status.peers()) == MAX_PEERS
    assert len(s["loss_history"]) == MAX_LOSS_POINTS and s["loss_history"][-1]["round"] == MAX_ROUNDS + 99
    assert len(status.rounds(limit=10_000)) == MAX_ROUNDS
    assert len(status.rejections()) == MAX_REJECTIONS
    assert (
        len(s["rejected_by_check"]) == MAX_CHECKS + 1
        and s["rejected_by_check"]["other"] == MAX_REJECTIONS + 50 - MAX_CHECKS
    )
    assert s["updates_rejected"] == MAX_REJECTIONS + 50


def test_the_longest_unseen_peers_are_evicted_first() -> None:
    # Prepare
    status = RunStatus()
    status.handle(ready())
    status.handle(received("pl-first", 0))
    status.handle(received("pl-second", 0))
    # Execute
    status.handle(received("pl-first", 0))  # seen again: now the second is the longest unseen
    for i in range(MAX_PEERS - 1):
        status.handle(received(f"pl-flood-{i}", 0))
    # Assert
    known = {p["fingerprint"] for p in status.peers()}
    assert "pl-first" in known and "pl-second" not in known


def test_events_from_several_threads_are_all_counted() -> None:
    # Prepare
    status = RunStatus()
    status.handle(ready())
    threads_n, per_thread = 4, 500

    def feed(t: int) -> None:
        for i in range(per_thread):
            status.handle(received(f"pl-{t}-{i}", 0))
            if i % 50 == 0:
                status.status()  # readers interleave with writers

    threads = [threading.Thread(target=feed, args=(t,)) for t in range(threads_n)]
    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Assert
    assert status.status()["peers_known"] == threads_n * per_thread
