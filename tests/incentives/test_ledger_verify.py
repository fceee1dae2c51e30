"""verify_ledger: an untouched ledger checks out; any edited, deleted, inserted or moved row or head is named."""

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from potluck.incentives.ledger import Ledger, LedgerError
from potluck.incentives.ledger_format import ROW_COLUMNS, LedgerRow, row_from_values, row_hash, row_values
from potluck.incentives.ledger_verify import Problem, verify_ledger
from potluck.protocol.identity import generate_identity
from tests.incentives.ledger_helpers import AGGREGATOR, ROUNDS, entry, fill_ledger

KEY = AGGREGATOR.public_key
ROW_COUNT = sum(len(flags) for flags in ROUNDS.values())  # rows 1-3 round 0, 4-7 round 1, 8-9 round 3


@contextmanager
def _tamper(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the ledger file, as someone editing it by hand would have."""
    db = sqlite3.connect(path)
    try:
        yield db
        db.commit()
    finally:
        db.close()


def _rehash(db: sqlite3.Connection, row_id: int) -> None:
    """Recompute one row's row_hash after an edit, as a careful forger would."""
    values = db.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM updates WHERE id = ?", (row_id,)).fetchone()
    row = row_from_values(values)
    digest = row_hash(row_id=row_id, round_index=row.round, entry=row.entry, prev_hash=row.prev_hash)
    db.execute("UPDATE updates SET row_hash = ? WHERE id = ?", (digest, row_id))


def test_an_untouched_ledger_verifies(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert report.ok and report.problem is None and report.message == ""
    assert (report.rows_checked, report.heads_checked) == (ROW_COUNT, len(ROUNDS))


def test_an_empty_ledger_verifies(tmp_path: Path) -> None:
    # Prepare
    Ledger.open(tmp_path / "ledger.sqlite").close()
    # Execute
    report = verify_ledger(tmp_path / "ledger.sqlite", KEY)
    # Assert
    assert report.ok and (report.rows_checked, report.heads_checked) == (0, 0)


def test_verify_reads_beside_an_open_writer(tmp_path: Path) -> None:
    path = fill_ledger(tmp_path)
    with Ledger.open(path) as ledger:
        ledger.append_round(round_index=4, entries=[entry(10)], identity=AGGREGATOR)
        report = verify_ledger(path, KEY)
        ledger.append_round(round_index=5, entries=[entry(11)], identity=AGGREGATOR)
    assert report.ok and report.rows_checked == ROW_COUNT + 1
    assert verify_ledger(path, KEY).rows_checked == ROW_COUNT + 2


# Row 5 is in the middle of round 1 and accepted; each edit keeps the column's type unless it says otherwise.
@pytest.mark.parametrize(
    "column, value, problem",
    [
        ("id", 100, Problem.MISSING_ROW),
        ("round", 0, Problem.ROW_HASH),
        ("peer_public_key", bytes([9]) * 32, Problem.ROW_HASH),
        ("tokens_claimed", 1_000_000, Problem.ROW_HASH),
        ("tokens_claimed", "a lot", Problem.MALFORMED_ROW),
        ("weight", 0.25, Problem.ROW_HASH),
        ("credit", 1e9, Problem.ROW_HASH),
        ("accepted", 0, Problem.MALFORMED_ROW),
        ("check_name", "norm", Problem.MALFORMED_ROW),
        ("detail", "edited", Problem.ROW_HASH),
        ("payload_sha256", bytes(32), Problem.ROW_HASH),
        ("update_digest", bytes(32), Problem.ROW_HASH),
        ("payload_bytes", 1, Problem.ROW_HASH),
        ("time_s", 0.0, Problem.ROW_HASH),
        ("prev_hash", bytes(32), Problem.BROKEN_LINK),
        ("row_hash", bytes(32), Problem.ROW_HASH),
        ("row_hash", b"short", Problem.MALFORMED_ROW),
    ],
)
def test_editing_any_column_of_one_row_names_that_row(
    tmp_path: Path, column: str, value: Any, problem: Problem
) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute(f"UPDATE updates SET {column} = ? WHERE id = 5", (value,))
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert not report.ok
    assert (report.problem, report.row_id, report.round) == (problem, 5, 1)
    assert report.rows_checked == 4 and report.heads_checked == 1
    assert "row 5" in report.message and "\n" not in report.message


def test_an_edited_row_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute("UPDATE updates SET credit = 1e9 WHERE id = 5")
        _rehash(db, 5)
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.row_id) == (Problem.BROKEN_LINK, 6)


def test_rewriting_the_last_row_is_caught_by_its_signed_head(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute("UPDATE updates SET credit = 1e9 WHERE id = 9")
        _rehash(db, 9)
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.row_id, report.round) == (Problem.HEAD_MISMATCH, None, 3)
    assert report.rows_checked == ROW_COUNT  # every row is sound on its own; the chain is not the signed one


@pytest.mark.parametrize("row_id, round_index", [(1, 0), (3, 0), (5, 1), (7, 1), (8, 3), (9, 3)])
def test_a_deleted_row_is_named(tmp_path: Path, row_id: int, round_index: int) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute("DELETE FROM updates WHERE id = ?", (row_id,))
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.row_id, report.round) == (Problem.MISSING_ROW, row_id, round_index)


def test_swapping_two_rows_is_named(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute("UPDATE updates SET id = -1 WHERE id = 5")
        db.execute("UPDATE updates SET id = 5 WHERE id = 6")
        db.execute("UPDATE updates SET id = 6 WHERE id = -1")
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.row_id) == (Problem.BROKEN_LINK, 5)
    assert "reordered" in report.message


def _forged_row(db: sqlite3.Connection, row_id: int, prev_id: int, round_index: int) -> tuple[Any, ...]:
    """A row that links correctly to row `prev_id` and hashes correctly: the best a forger without the key can do."""
    prev_hash = db.execute("SELECT row_hash FROM updates WHERE id = ?", (prev_id,)).fetchone()[0]
    forged = entry(99, credit=1e9)
    digest = row_hash(row_id=row_id, round_index=round_index, entry=forged, prev_hash=prev_hash)
    return row_values(LedgerRow(row_id=row_id, round=round_index, entry=forged, prev_hash=prev_hash, row_hash=digest))


def test_a_row_appended_after_the_last_head_is_named(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        values = _forged_row(db, ROW_COUNT + 1, ROW_COUNT, 3)
        db.execute(f"INSERT INTO updates ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * 15)})", values)
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.row_id) == (Problem.UNSIGNED_ROW, ROW_COUNT + 1)
    assert report.rows_checked == ROW_COUNT and report.heads_checked == len(ROUNDS)


def test_a_row_inserted_midway_is_named(tmp_path: Path) -> None:
    # Prepare: make room after row 4 and slip a well-formed, well-linked row in
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute("UPDATE updates SET id = id + 1000 WHERE id >= 5")
        db.execute("UPDATE updates SET id = id - 999 WHERE id >= 1000")
        values = _forged_row(db, 5, 4, 1)
        db.execute(f"INSERT INTO updates ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * 15)})", values)
    # Execute
    report = verify_ledger(path, KEY)
    # Assert: the row after the forgery no longer links to its predecessor
    assert (report.problem, report.row_id) == (Problem.BROKEN_LINK, 6)


@pytest.mark.parametrize(
    "column, value, problem",
    [
        ("signature", bytes(64), Problem.HEAD_SIGNATURE),
        ("head_hash", bytes(32), Problem.HEAD_SIGNATURE),
        ("last_row_id", 6, Problem.HEAD_SIGNATURE),
        ("row_count", 3, Problem.HEAD_SIGNATURE),
        ("timestamp_s", 0.0, Problem.HEAD_SIGNATURE),
        ("aggregator_public_key", bytes(range(32)), Problem.HEAD_KEY),
        ("signature", b"\x00" * 63, Problem.MALFORMED_HEAD),
    ],
)
def test_an_edited_head_is_named(tmp_path: Path, column: str, value: Any, problem: Problem) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute(f"UPDATE heads SET {column} = ? WHERE round = 1", (value,))
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.row_id, report.round) == (problem, None, 1)
    assert report.heads_checked == 1 and "round 1" in report.message


def test_a_flipped_bit_in_a_head_signature_is_named(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        signature = db.execute("SELECT signature FROM heads WHERE round = 3").fetchone()[0]
        db.execute("UPDATE heads SET signature = ? WHERE round = 3", (bytes([signature[0] ^ 1]) + signature[1:],))
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.round) == (Problem.HEAD_SIGNATURE, 3)


def test_a_deleted_head_is_named(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute("DELETE FROM heads WHERE round = 1")
    # Execute
    report = verify_ledger(path, KEY)
    # Assert: round 1's rows now sit inside the span of the next head (round 2's, which added none)
    assert (report.problem, report.row_id, report.round) == (Problem.MISPLACED_ROW, 4, 2)


def test_a_deleted_last_head_leaves_its_rows_unsigned(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with _tamper(path) as db:
        db.execute("DELETE FROM heads WHERE round = 3")
    # Execute
    report = verify_ledger(path, KEY)
    # Assert
    assert (report.problem, report.row_id) == (Problem.UNSIGNED_ROW, 8)


def test_another_aggregators_key_fails_at_the_first_head(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    other = generate_identity()
    # Execute
    report = verify_ledger(path, other.public_key)
    # Assert
    assert (report.problem, report.round, report.heads_checked) == (Problem.HEAD_KEY, 0, 0)
    assert AGGREGATOR.fingerprint in report.message and other.fingerprint in report.message


def test_verify_refuses_a_key_that_is_not_one() -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        verify_ledger("unused", KEY.hex())  # type: ignore[arg-type]


def test_verify_never_creates_a_ledger(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "missing.sqlite"
    # Execute / Assert
    with pytest.raises(LedgerError, match="no ledger at"):
        verify_ledger(path, KEY)
    assert not path.exists()


@pytest.mark.parametrize("content", [b"garbage " * 100, b""], ids=["garbage", "empty"])
def test_verify_refuses_a_file_that_is_not_a_ledger(tmp_path: Path, content: bytes) -> None:
    # Prepare
    path = tmp_path / "thing"
    path.write_bytes(content)
    # Execute / Assert
    with pytest.raises(LedgerError, match="not a potluck ledger"):
        verify_ledger(path, KEY)
    assert path.read_bytes() == content
