"""`potluck bans list|add|lift` on a state dir, as an operator runs them beside a running aggregator."""

import json
from pathlib import Path

from typer.testing import CliRunner

from potluck.aggregator_server.reputation import BANS_FILE, Reputation
from potluck.cli.app import app
from potluck.protocol.identity import generate_identity

RUNNER = CliRunner()
PEER = generate_identity()


def _bans(state_dir: Path, *args: str):  # noqa: ANN202
    return RUNNER.invoke(app, ["bans", *args, "--state-dir", str(state_dir)])


def test_an_operators_ban_and_lift_reach_a_running_aggregator(tmp_path: Path) -> None:
    # Prepare: the aggregator's record, open (as it is while the aggregator runs)
    running = Reputation.open(tmp_path)
    # Execute / Assert
    added = _bans(tmp_path, "add", PEER.public_key.hex(), "--reason", "spam")
    running.reload_if_changed()
    assert added.exit_code == 0, added.output
    assert running.is_banned(PEER.public_key) and running.bans[PEER.public_key].reason == "spam"
    listed = _bans(tmp_path, "list", "--json")
    assert [b["fingerprint"] for b in json.loads(listed.output)["bans"]] == [PEER.fingerprint]
    lifted = _bans(tmp_path, "lift", PEER.fingerprint)
    running.reload_if_changed()
    assert lifted.exit_code == 0, lifted.output
    assert not running.is_banned(PEER.public_key)
    running.close()


def test_listing_a_directory_with_no_record_creates_nothing(tmp_path: Path) -> None:
    listed = _bans(tmp_path / "typo", "list", "--json")

    assert listed.exit_code == 0 and json.loads(listed.output) == {"bans": [], "strikes": {}}
    assert not (tmp_path / "typo").exists() and not (tmp_path / BANS_FILE).exists()
