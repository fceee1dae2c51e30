"""The admin endpoints of a real aggregator's status page: refused without the token or with a wrong one,
and with the right one a ban that the aggregator keeps (its ban list) and a close-round it answers."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from potluck.protocol.identity import generate_identity
from tests.integration.swarm_helpers import Nodes, free_port

pytestmark = [pytest.mark.network, pytest.mark.slow]

TOKEN = "a-long-random-admin-token-0123456789"


@pytest.mark.timeout(180)
def test_admin_actions_need_the_token_and_act_on_the_aggregator(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: an aggregator with a status page and an admin token file
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    state_dir, port = tmp_path / "aggregator", free_port()
    aggregator = nodes.start(
        "aggregator",
        "aggregator",
        "--state-dir", str(state_dir),
        "--host", "127.0.0.1",
        "--http-port", str(port),
        "--admin-token-file", str(token_file),
    )  # fmt: skip
    page = aggregator.next_event(lambda e: e.get("event") == "status-page", timeout_s=90)["url"]
    aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=90)
    victim = generate_identity()
    ban = {"peer": victim.public_key.hex(), "reason": "test ban"}
    # Execute / Assert: no token, a wrong one: 401 and nothing changes
    with httpx.Client(base_url=page, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token-wrong"}, {"Authorization": TOKEN}):
            refused = http.post("/api/admin/ban", json=ban, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        right = {"Authorization": f"Bearer {TOKEN}"}
        # a fingerprint the run has never seen, and a round with nothing to close: clear refusals
        assert http.post("/api/admin/ban", json={"peer": "pl-aaaa-bbbb-cccc-dddd"}, headers=right).status_code == 404
        assert http.post("/api/admin/close-round", headers=right).status_code == 400
        # the right token bans for real
        done = http.post("/api/admin/ban", json=ban, headers=right)
        assert done.status_code == 200 and done.json()["banned"] == victim.fingerprint
    aggregator.next_event(
        lambda e: e.get("event") == "banned" and e["fingerprint"] == victim.fingerprint, timeout_s=10
    )
    listed = subprocess.run(
        [sys.executable, "-m", "potluck", "bans", "list", "--state-dir", str(state_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [b["fingerprint"] for b in json.loads(listed.stdout)["bans"]] == [victim.fingerprint]
