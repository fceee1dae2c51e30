"""The peer's own status: what it trained, sent and earned, folded from its events and served as JSON."""

import dataclasses
import json

import pytest

from potluck.events import Finished, PeerDone, ReceiptReceived, StateRefused, UpdateRejected
from potluck.web import PeerStatus, create_peer_app
from potluck.web.peer_status import MAX_LOSS_POINTS
from tests.web.conftest import TestClient
from tests.web.events import AGGREGATOR, ALICE, peer_events, peer_round


@pytest.fixture
def peer_status() -> PeerStatus:
    status = PeerStatus()
    for event in peer_events():
        status.handle(event)
    return status


def test_a_peer_before_syncing_has_nothing_to_show() -> None:
    # Execute
    s = PeerStatus().status()
    # Assert
    assert (s["phase"], s["round"], s["fingerprint"], s["loss"], s["rounds_done"]) == ("syncing", None, None, None, 0)


def test_the_peers_rounds_and_receipts_add_up(peer_status: PeerStatus) -> None:
    # Execute
    s = peer_status.status()
    # Assert
    assert (s["fingerprint"], s["run"], s["aggregator"]) == (ALICE, "tiny-stdlib", AGGREGATOR)
    assert (s["phase"], s["round"], s["rounds_done"]) == ("training", 5, 2)
    assert s["loss"] == 4.0 and s["loss_history"] == [{"round": 3, "loss": 4.2}, {"round": 4, "loss": 4.0}]
    assert s["tokens_per_s"] == 800.0
    assert (s["bytes_up"], s["bytes_down"], s["state_bytes"]) == (100_000, 160_000, 9_000_000)
    assert s["state_bytes_served"] == 3_000_000  # a running total, not summed per round
    assert (s["accepted"], s["rejected"]) == (1, 1)
    assert (s["receipts"], s["score_total"], s["tokens_credited"]) == (1, 4.0, 4096)
    assert s["last_rejection"] == {"round": 4, "reason": "stale: built on round 2"}
    assert s["finished"] is False


def test_a_finished_run_stays_finished_after_the_peer_stops(peer_status: PeerStatus) -> None:
    # Execute
    peer_status.handle(Finished(detail="run 'tiny-stdlib' is complete (5 rounds)"))
    peer_status.handle(
        PeerDone(
            fingerprint=ALICE,
            rounds=2,
            accepted=1,
            rejected=1,
            bytes_up=100_000,
            bytes_down=160_000,
            state_bytes_served=3_000_000,
            receipts=1,
            score=4.0,
            tokens=8192,
            inner_steps=16,
            compute_s=10.0,
            active_s=12.0,
            compute_utilization=10 / 12,
            overlap=False,
            speed=1.0,
            nice=10,
        )
    )
    # Assert
    s = peer_status.status()
    assert s["finished"] and s["phase"] == "finished" and s["detail"] == "run 'tiny-stdlib' is complete (5 rounds)"


def test_a_refused_receipt_is_the_last_rejection_and_earns_nothing(peer_status: PeerStatus) -> None:
    # Execute
    peer_status.handle(
        ReceiptReceived(
            round=4, accepted=False, tokens_credited=0, score=9.0, reason="dropped at close", update="bb" * 8, shard=0
        )
    )
    peer_status.handle(StateRefused(aggregator="pl-x", detail="bad signature"))
    # Assert
    s = peer_status.status()
    assert s["receipts"] == 1 and s["score_total"] == 4.0
    assert s["last_rejection"] == {"round": 4, "reason": "dropped at close"}
    assert s["state_refusals"] == 1


def test_the_loss_history_is_bounded_and_a_diverged_loss_or_another_nodes_event_is_ignored() -> None:
    # Prepare
    status = PeerStatus()
    # Execute
    for r in range(MAX_LOSS_POINTS + 10):
        status.handle(peer_round(r, loss=1.0))
    status.handle(dataclasses.replace(peer_round(MAX_LOSS_POINTS + 10), loss=float("nan"), tokens_per_s=float("inf")))
    status.handle(
        UpdateRejected(fingerprint=ALICE, round=1, check="norm", reason="an aggregator's event", update=None)
    )
    # Assert
    s = status.status()
    assert len(s["loss_history"]) == MAX_LOSS_POINTS and s["loss"] == 1.0 and s["tokens_per_s"] == 800.0
    json.dumps(s, allow_nan=False)


def test_the_peer_app_serves_health_status_and_a_page(peer_status: PeerStatus) -> None:
    # Prepare
    client = TestClient(create_peer_app(peer_status))
    # Execute
    health = client.get("/api/health")
    status = client.get("/api/status")
    page = client.get("/")
    script = client.get("/static/peer.js")
    # Assert
    assert health.json() == {"ok": True, "phase": "training", "round": 5}
    assert status.status_code == 200 and status.json() == peer_status.status()
    assert page.status_code == 200 and '<script src="/static/peer.js"' in page.text
    assert script.status_code == 200
    assert {"/api/health", "/api/status"} <= set(client.get("/openapi.json").json()["paths"])
