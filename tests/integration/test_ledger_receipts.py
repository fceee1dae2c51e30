"""The ledger and the receipts of a real swarm: the chain verifies, a one-row edit is named, receipts and their
Merkle proofs verify offline against the signed aggregates, and a crash of the aggregator loses no committed row."""

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from potluck.incentives.ledger import Ledger
from potluck.protocol.envelope import SignedAggregate
from potluck.protocol.identity import load_or_create_identity
from tests.integration.swarm_helpers import Nodes, free_port

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUNDS = 3
SETTINGS = dict(
    rounds=ROUNDS, round_deadline_s=30, local_steps=3, inner__warmup_steps=2, inner__batch_size=8,
    data__max_bytes=400_000,
)  # fmt: skip


def _potluck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "potluck", *args], capture_output=True, text=True, timeout=120)


def _aggregator_key(state_dir: Path) -> str:
    identity, created = load_or_create_identity(state_dir / "identity.key")
    assert not created
    return identity.public_key.hex()


@pytest.mark.timeout(300)
def test_a_finished_swarms_ledger_and_receipts_verify_and_an_edit_is_named(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: a 2-peer run of 3 rounds, each peer keeping its receipts
    state_dir = tmp_path / "aggregator"
    aggregator = nodes.aggregator(state_dir=state_dir, **SETTINGS)
    join = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    peers = [nodes.peer(f"peer-{i}", join, "--receipts", str(tmp_path / f"receipts-{i}")) for i in range(2)]
    aggregator.next_event(lambda e: e.get("event") == "done", timeout_s=240)
    summaries = [p.next_event(lambda e: e.get("event") == "done", timeout_s=60) for p in peers]
    key = _aggregator_key(state_dir)
    ledger_path = state_dir / "ledger.sqlite"

    # Execute / Assert: the ledger verifies against the aggregator's key
    verified = _potluck("ledger", "verify", "--db", str(ledger_path), "--key", key, "--json")
    report = json.loads(verified.stdout)
    assert verified.returncode == 0 and report["ok"], verified.stdout + verified.stderr
    assert report["heads_checked"] == ROUNDS and report["rows_checked"] >= 2 * ROUNDS

    # every receipt each peer kept verifies offline, Merkle proof included
    for i, summary in enumerate(summaries):
        checked = _potluck("receipts", "verify", "--receipts", str(tmp_path / f"receipts-{i}"), "--key", key, "--json")
        result = json.loads(checked.stdout)
        assert checked.returncode == 0 and result["ok"], checked.stdout
        assert result["verified"] == summary["accepted"] == summary["receipts"] >= 1
        assert result["points"] == pytest.approx(summary["score"]) and result["points"] > 0

    # each aggregate a peer kept commits to the ledger head the aggregator signed for its round
    with Ledger.open(ledger_path, read_only=True) as ledger:
        heads = {h.round: h.head_hash for h in ledger.heads()}
    kept = sorted((tmp_path / "receipts-0").glob("*/aggregate-*.bin"))
    assert kept
    for path in kept:
        header = SignedAggregate.from_bytes(path.read_bytes()).header
        assert header.ledger_head == heads[header.round]

    # a single-row edit, in a copy, is named by the verifier
    edited = tmp_path / "edited.sqlite"
    shutil.copy(ledger_path, edited)
    with sqlite3.connect(edited) as db:
        db.execute("UPDATE updates SET credit = credit + 1 WHERE id = 2")
    bad = _potluck("ledger", "verify", "--db", str(edited), "--key", key, "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["row_id"] == 2


@pytest.mark.timeout(300)
def test_killing_the_aggregator_mid_round_loses_no_committed_row(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: a run whose round 0 has closed and whose round 1 is collecting
    port, state_dir = free_port(), tmp_path / "aggregator"
    first = nodes.aggregator("first", state_dir=state_dir, port=port, **SETTINGS)
    join = first.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    for i in range(2):
        nodes.peer(f"peer-{i}", join, "--receipts", str(tmp_path / f"receipts-{i}"))
    first.next_event(lambda e: e.get("event") == "round" and e["round"] == 0, timeout_s=120)
    # Execute: a crash, then a restart on the same directory and port
    first.kill()
    with Ledger.open(state_dir / "ledger.sqlite", read_only=True) as ledger:
        committed = ledger.rows()
        committed_heads = ledger.heads()
    second = nodes.aggregator("second", state_dir=state_dir, port=port, **SETTINGS)
    second.next_event(lambda e: e.get("event") == "done", timeout_s=240)
    # Assert: every row and head written before the crash is still there, unchanged, and the chain verifies
    assert committed and committed_heads
    with Ledger.open(state_dir / "ledger.sqlite", read_only=True) as ledger:
        assert ledger.rows()[: len(committed)] == committed
        assert ledger.heads()[: len(committed_heads)] == committed_heads
        assert [h.round for h in ledger.heads()] == list(range(ROUNDS))
    verified = _potluck(
        "ledger", "verify", "--db", str(state_dir / "ledger.sqlite"), "--key", _aggregator_key(state_dir)
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
