"""The aggregator's web app: JSON endpoints, the dashboard and its assets, served from a real RunStatus."""

import dataclasses
import re
from pathlib import Path

import pytest

from potluck.web import RunStatus, create_app
from potluck.web.app import STATIC_DIR
from tests.web.conftest import TestClient
from tests.web.events import ALICE, BOB, MADDR, MALLORY, closed, head, ready


def test_health_says_ok_with_phase_and_round(client: TestClient) -> None:
    # Execute
    response = client.get("/api/health")
    # Assert
    assert response.status_code == 200
    assert response.json() == {"ok": True, "phase": "collecting", "round": 2}


def test_status_serves_the_run_at_a_glance(client: TestClient, run_status: RunStatus) -> None:
    # Execute
    body = client.get("/api/status").json()
    # Assert
    assert body == run_status.status()
    assert body["seconds_to_deadline"] == pytest.approx(50.0)
    assert [p["val_loss"] for p in body["loss_history"]] == [5.5, 5.0, 4.5]
    assert body["join_command"] == f"peer --join {MADDR}"


def test_join_serves_the_aggregators_multiaddrs(client: TestClient) -> None:
    # Execute
    body = client.get("/api/join").json()
    # Assert
    assert body == {
        "run": "tiny-stdlib",
        "fingerprint": ready().fingerprint,
        "maddrs": [MADDR, "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWExample"],
    }


def test_join_is_unavailable_until_the_aggregator_is_ready() -> None:
    # Setup
    client = TestClient(create_app(RunStatus()))
    # Execute
    response = client.get("/api/join")
    # Assert
    assert response.status_code == 503
    assert "starting" in response.json()["detail"]


def test_peers_lists_each_peer_with_its_verdicts(client: TestClient) -> None:
    # Execute
    body = client.get("/api/peers").json()
    # Assert
    by_name = {p["fingerprint"]: p for p in body}
    assert set(by_name) == {ALICE, BOB, MALLORY}
    assert by_name[ALICE]["accepted"] == 2 and by_name[ALICE]["status"] == "active"
    assert by_name[MALLORY]["status"] == "banned"
    assert by_name[MALLORY]["last_rejection"] == {
        "round": 1,
        "check": "norm",
        "reason": "update norm 1e9 over 10x the median",
    }
    assert by_name[MALLORY]["client_mode"] is None
    assert len(client.get("/api/peers", params={"limit": 1}).json()) == 1


def test_rounds_are_newest_first_and_limited(client: TestClient) -> None:
    # Execute
    every = client.get("/api/rounds").json()
    one = client.get("/api/rounds", params={"limit": 1}).json()
    # Assert
    assert [r["round"] for r in every] == [1, 0]
    assert [r["round"] for r in one] == [1]
    assert every[0]["closed_by"] == "all-reported" and every[0]["accepted"] == 1 and every[0]["rejected"] == 1


@pytest.mark.parametrize("limit", ["0", "1001", "-5", "many"])
def test_rounds_refuse_a_limit_outside_1_to_1000(client: TestClient, limit: str) -> None:
    # Execute
    response = client.get("/api/rounds", params={"limit": limit})
    # Assert
    assert response.status_code == 422


def test_leaderboard_ranks_by_points(client: TestClient) -> None:
    # Execute
    body = client.get("/api/leaderboard").json()
    # Assert
    assert [(s["rank"], s["fingerprint"], s["points"], s["accepted"]) for s in body] == [
        (1, ALICE, 18.0, 4),
        (2, BOB, 4.0, 1),
    ]


def test_rejections_carry_check_and_reason(client: TestClient) -> None:
    # Execute
    body = client.get("/api/rejections").json()
    # Assert
    assert [(r["fingerprint"], r["check"], r["round"]) for r in body] == [(MALLORY, "norm", 1)]


def test_the_ledger_head_is_404_until_a_round_closes_then_served() -> None:
    # Prepare
    status = RunStatus()
    status.handle(ready())
    client = TestClient(create_app(status))
    # Execute
    before = client.get("/api/ledger/head")
    status.handle(closed(0, accepted=[ALICE], val_loss=5.0))
    after = client.get("/api/ledger/head")
    # Assert
    assert before.status_code == 404
    assert "no ledger head yet" in before.json()["detail"]
    assert after.status_code == 200
    assert after.json() == dataclasses.asdict(head(0))


def test_a_fresh_status_serves_every_endpoint() -> None:
    # Prepare
    client = TestClient(create_app(RunStatus()))
    # Execute
    responses = {path: client.get(path) for path in ("/api/status", "/api/peers", "/api/rounds", "/metrics", "/")}
    # Assert
    assert {path: r.status_code for path, r in responses.items()} == dict.fromkeys(responses, 200)
    assert responses["/api/status"].json()["phase"] == "starting"


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    # Execute
    spec = client.get("/openapi.json").json()
    # Assert
    assert spec["info"]["title"] == "potluck status"
    assert {
        "/api/health",
        "/api/status",
        "/api/peers",
        "/api/rounds",
        "/api/leaderboard",
        "/api/rejections",
        "/api/ledger/head",
        "/metrics",
        "/api/admin/ban",
        "/api/admin/unban",
        "/api/admin/close-round",
    } <= set(spec["paths"])
    assert spec["paths"]["/api/rounds"]["get"]["summary"]
    assert "RunStatusReply" in spec["components"]["schemas"]


def test_the_dashboard_is_html_loading_only_local_assets(client: TestClient) -> None:
    # Execute
    response = client.get("/")
    # Assert
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert "/static/dashboard.js" in assets and "/static/dashboard.css" in assets
    assert all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for element in ('id="loss-chart"', 'id="loss-line"', 'id="peers-table"', 'id="leaderboard-table"'):
        assert element in response.text
    assert 'id="rejections"' in response.text and 'id="join-command"' in response.text


@pytest.mark.parametrize("name", ["index.html", "dashboard.js", "dashboard.css", "peer.html", "peer.js"])
def test_no_asset_reaches_outside_the_package(name: str) -> None:
    # Execute
    text = (STATIC_DIR / name).read_text(encoding="utf-8")
    # Assert
    assert "http://" not in text and "https://" not in text
    assert "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text
    assert "document.write" not in text and "eval(" not in text


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/static/dashboard.js", "javascript"), ("/static/dashboard.css", "text/css"), ("/static/index.html", "html")],
)
def test_static_assets_are_served(client: TestClient, path: str, content_type: str) -> None:
    # Execute
    response = client.get(path)
    # Assert
    assert response.status_code == 200
    assert content_type in response.headers["content-type"]
    assert response.content == (STATIC_DIR / Path(path).name).read_bytes()


def test_the_dashboard_script_drives_what_a_browser_test_waits_on() -> None:
    # Execute
    script = (STATIC_DIR / "dashboard.js").read_text(encoding="utf-8")
    # Assert
    assert "document.body.dataset.rounds" in script
    assert "connection lost" in (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    assert "navigator.clipboard" in script and 'execCommand("copy")' in script
