"""`potluck ledger verify|export` and `potluck leaderboard` on a real ledger file, as a user runs them."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from potluck.cli.app import app
from tests.incentives.ledger_helpers import AGGREGATOR, fill_ledger

RUNNER = CliRunner()


def _run(*args: str):  # noqa: ANN202
    return RUNNER.invoke(app, list(args))


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it: one-line errors on stderr, exit 2."""
    command = [sys.executable, "-c", "from potluck.cli.app import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_verify_passes_on_an_untouched_ledger_and_pins_the_key_when_given(tmp_path: Path) -> None:
    db = str(fill_ledger(tmp_path))

    found = _run("ledger", "verify", "--db", db)
    pinned = _run("ledger", "verify", "--db", db, "--key", AGGREGATOR.public_key.hex(), "--json")

    assert found.exit_code == 0, found.output
    assert found.output.startswith("ok: 9 row(s) and 4 signed head(s)") and "pass --key" in found.output
    assert pinned.exit_code == 0 and json.loads(pinned.output)["key_pinned"] is True


def test_verify_fails_naming_the_row_after_a_single_row_edit(tmp_path: Path) -> None:
    # Prepare
    db = fill_ledger(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE updates SET credit = credit * 10 WHERE id = 5")
    # Execute
    human = _run("ledger", "verify", "--db", str(db))
    machine = _run("ledger", "verify", "--db", str(db), "--json")
    # Assert
    assert human.exit_code == 1 and human.output.startswith("BAD:") and "5" in human.output
    report = json.loads(machine.output)
    assert machine.exit_code == 1 and report["ok"] is False and report["row_id"] == 5


def test_verify_with_another_aggregators_key_fails(tmp_path: Path) -> None:
    result = _run("ledger", "verify", "--db", str(fill_ledger(tmp_path)), "--key", "ab" * 32)

    assert result.exit_code == 1 and result.output.startswith("BAD:")


def test_a_missing_or_foreign_file_is_one_line_and_never_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a ledger")

    gone = _console("ledger", "verify", "--db", str(missing))
    junk = _console("ledger", "export", "--db", str(foreign))

    assert gone.returncode == 2 and "no ledger at" in gone.stderr and not missing.exists()
    assert junk.returncode == 2 and len(junk.stderr.strip().splitlines()) == 1, junk.stderr
    assert "Traceback" not in junk.stderr and foreign.read_text() == "not a ledger"


def test_export_and_leaderboard(tmp_path: Path) -> None:
    db = str(fill_ledger(tmp_path))

    as_json = _run("ledger", "export", "--db", db, "--format", "json")
    as_csv = _run("ledger", "export", "--db", db, "--format", "csv")
    board = _run("leaderboard", "--db", db, "--json")

    assert as_json.exit_code == 0 and len(json.loads(as_json.output)) == 9
    assert as_csv.exit_code == 0 and len(as_csv.output.strip().splitlines()) == 10  # header + 9 rows
    ranked = json.loads(board.output)["leaderboard"]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert ranked == sorted(ranked, key=lambda r: -r["points"]) and sum(r["accepted_updates"] for r in ranked) == 7
