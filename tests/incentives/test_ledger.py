"""The ledger store: appending rounds durably and atomically, reading them back, refusing foreign files, exports."""

import csv
import dataclasses
import io
import json
import sqlite3
import struct
from pathlib import Path

import pytest

from potluck.incentives.ledger import Ledger, LedgerError, export_rows
from potluck.incentives.ledger_format import GENESIS_HASH, row_hash
from potluck.incentives.ledger_verify import verify_ledger
from potluck.protocol.identity import Identity, fingerprint, generate_identity
from tests.incentives.ledger_helpers import AGGREGATOR, ROUNDS, entry, fill_ledger


def test_append_chains_the_rows_and_returns_the_signed_head(tmp_path: Path) -> None:
    # Prepare
    entries = [entry(1), entry(2, accepted=False), entry(3)]
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        # Execute
        head = ledger.append_round(round_index=5, entries=entries, identity=AGGREGATOR, timestamp_s=1.5)
        rows = ledger.rows()
        # Assert
        assert [r.entry for r in rows] == entries
        assert [r.row_id for r in rows] == [1, 2, 3] and {r.round for r in rows} == {5}
        assert [r.prev_hash for r in rows] == [GENESIS_HASH, rows[0].row_hash, rows[1].row_hash]
        for r in rows:
            assert r.row_hash == row_hash(row_id=r.row_id, round_index=5, entry=r.entry, prev_hash=r.prev_hash)
        assert (head.round, head.last_row_id, head.head_hash, head.row_count) == (5, 3, rows[2].row_hash, 3)
        assert head.timestamp_s == 1.5 and head.verify(AGGREGATOR.public_key)
        assert ledger.head() == head and ledger.heads() == [head]


def test_a_round_without_updates_still_gets_a_head(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        head = ledger.append_round(round_index=0, entries=[], identity=AGGREGATOR)
        assert (head.last_row_id, head.head_hash, head.row_count) == (0, GENESIS_HASH, 0)
        assert head.verify(AGGREGATOR.public_key)


def test_rows_can_be_read_by_round_and_by_peer(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    peer = entry(2).peer_public_key
    with Ledger.open(path) as ledger:
        # Execute
        by_round = ledger.rows(round_index=1)
        by_peer = ledger.rows(peer_public_key=peer)
        by_both = ledger.rows(round_index=1, peer_public_key=peer)
        # Assert
        assert [r.row_id for r in by_round] == [4, 5, 6, 7]
        assert [r.row_id for r in by_peer] == [2, 5, 8]
        assert [r.row_id for r in by_both] == [5]
        assert ledger.rows(round_index=2) == []


def test_points_sum_the_credit_per_peer_and_rejected_updates_earn_nothing(tmp_path: Path) -> None:
    # Prepare: peers are i % 3 + 1, so updates 1 and 4 are peer 2's, 2 and 5 peer 3's, 3 peer 1's
    entries = [entry(1), entry(2, accepted=False), entry(3, credit=10.0), entry(4)]
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.append_round(round_index=0, entries=entries, identity=AGGREGATOR)
        ledger.append_round(round_index=1, entries=[entry(5, accepted=False)], identity=AGGREGATOR)
        # Execute
        points = ledger.points()
    # Assert
    assert points == {bytes([2]) * 32: 4097.0 + 4100.0, bytes([1]) * 32: 10.0, bytes([3]) * 32: 0.0}
    assert list(points) == [bytes([2]) * 32, bytes([1]) * 32, bytes([3]) * 32]


def test_recent_weights_are_a_peers_accepted_weights_newest_first(tmp_path: Path) -> None:
    # Prepare: updates 1, 4 and 7 are peer 2's; 4 is rejected
    peer = bytes([2]) * 32
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.append_round(round_index=0, entries=[entry(1, weight=10.0), entry(2)], identity=AGGREGATOR)
        ledger.append_round(round_index=1, entries=[entry(4, accepted=False)], identity=AGGREGATOR)
        ledger.append_round(round_index=2, entries=[entry(7, weight=30.0)], identity=AGGREGATOR)
        # Execute / Assert
        assert ledger.recent_weights(peer) == [30.0, 10.0]
        assert ledger.recent_weights(peer, limit=1) == [30.0]
        assert ledger.recent_weights(bytes([9]) * 32) == []


def test_each_round_is_appended_once_and_in_order(tmp_path: Path) -> None:
    path = fill_ledger(tmp_path)
    with Ledger.open(path) as ledger:
        for round_index in (3, 0):
            with pytest.raises(LedgerError, match="already has round 3"):
                ledger.append_round(round_index=round_index, entries=[], identity=AGGREGATOR)
        head = ledger.head()
        assert head is not None and head.round == 3


def test_another_aggregator_cannot_append_to_the_ledger(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    other = generate_identity()
    with Ledger.open(path) as ledger:
        # Execute / Assert
        with pytest.raises(LedgerError, match=f"not {other.fingerprint}"):
            ledger.append_round(round_index=4, entries=[], identity=other)


def test_reopening_after_close_keeps_everything(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with Ledger.open(path) as ledger:
        rows, heads, points = ledger.rows(), ledger.heads(), ledger.points()
    # Execute
    with Ledger.open(path) as ledger:
        # Assert
        assert (ledger.rows(), ledger.heads(), ledger.points()) == (rows, heads, points)
        head = ledger.append_round(round_index=4, entries=[entry(10)], identity=AGGREGATOR)
        assert head.last_row_id == 10 and ledger.rows()[-1].prev_hash == rows[-1].row_hash
    assert verify_ledger(path, AGGREGATOR.public_key).ok


def test_a_closed_ledger_refuses_to_be_used(tmp_path: Path) -> None:
    # Prepare
    ledger = Ledger.open(tmp_path / "ledger.sqlite")
    # Execute
    ledger.close()
    ledger.close()
    # Assert
    with pytest.raises(LedgerError, match="is closed"):
        ledger.rows()
    with pytest.raises(LedgerError, match="is closed"):
        ledger.append_round(round_index=0, entries=[], identity=AGGREGATOR)


def test_the_file_is_in_wal_mode_and_commits_with_full_sync(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "new" / "dir" / "ledger.sqlite"
    # Execute
    with Ledger.open(path) as ledger:
        synchronous = ledger._query("PRAGMA synchronous")[0][0]  # a per-connection setting: ask the ledger's own
        # Assert
        assert synchronous == 2  # FULL
    outside = sqlite3.connect(path)
    try:
        assert outside.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        outside.close()


def _foreign_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (name TEXT)")
    db.commit()
    db.close()


def _other_application(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA application_id = 1234")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "make_file, message",
    [
        (lambda p: p.write_bytes(b"not a database at all, just some bytes " * 100), "not a potluck ledger"),
        (_foreign_sqlite, "not a potluck ledger"),
        (_other_application, "not a potluck ledger"),
        (lambda p: p.mkdir(), "cannot"),
    ],
    ids=["garbage", "foreign-sqlite", "other-application", "directory"],
)
def test_a_file_that_is_not_a_ledger_is_refused_in_one_line(tmp_path: Path, make_file, message: str) -> None:
    # Prepare
    path = tmp_path / "thing"
    make_file(path)
    before = path.read_bytes() if path.is_file() else None
    # Execute
    with pytest.raises(LedgerError, match=message) as caught:
        Ledger.open(path)
    # Assert
    assert "\n" not in str(caught.value)
    assert before is None or path.read_bytes() == before  # someone else's file is left as it was


def test_a_ledger_from_a_newer_potluck_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    # Execute / Assert
    with pytest.raises(LedgerError, match="v2 ledger; this potluck reads v1, upgrade it"):
        Ledger.open(path)


def test_append_writes_nothing_when_a_row_fails_midway(tmp_path: Path) -> None:
    # Prepare: the third entry carries a value no row can hold, slipped past its constructor as a bug might
    path = fill_ledger(tmp_path)
    entries = [entry(10), entry(11), entry(12)]
    object.__setattr__(entries[2], "tokens_claimed", 2**64)
    with Ledger.open(path) as ledger:
        before = (ledger.rows(), ledger.heads())
        # Execute
        with pytest.raises(struct.error):
            ledger.append_round(round_index=4, entries=entries, identity=AGGREGATOR)
        # Assert
        assert (ledger.rows(), ledger.heads()) == before
        head = ledger.append_round(round_index=4, entries=entries[:2], identity=AGGREGATOR)
        assert head.last_row_id == 11  # no id was used up by the failed round
    assert verify_ledger(path, AGGREGATOR.public_key).ok


class _BrokenSigner:
    """An identity whose signing fails, after append_round has written the round's rows."""

    def __init__(self, identity: Identity) -> None:
        self.public_key = identity.public_key

    def sign(self, data: bytes) -> bytes:
        raise OSError("the signing key's disk went away")


def test_append_writes_nothing_when_signing_the_head_fails(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    signer: Identity = _BrokenSigner(AGGREGATOR)  # type: ignore[assignment]
    with Ledger.open(path) as ledger:
        before = (ledger.rows(), ledger.heads())
        # Execute
        with pytest.raises(OSError, match="went away"):
            ledger.append_round(round_index=4, entries=[entry(10)], identity=signer)
        # Assert
        assert (ledger.rows(), ledger.heads()) == before


def test_append_refuses_anything_but_entries(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        not_entries: list = [dataclasses.asdict(entry(1))]
        with pytest.raises(TypeError):
            ledger.append_round(round_index=0, entries=not_entries, identity=AGGREGATOR)
        with pytest.raises(ValueError, match="round_index"):
            ledger.append_round(round_index=-1, entries=[], identity=AGGREGATOR)
        assert ledger.heads() == []


def test_exports_hold_every_row_exactly(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    with Ledger.open(path) as ledger:
        rows = ledger.rows()
        # Execute
        as_json = json.loads(export_rows(ledger, "json"))
        as_csv = list(csv.DictReader(io.StringIO(export_rows(ledger, "csv"))))
    # Assert
    assert len(as_json) == len(as_csv) == len(rows) == sum(len(flags) for flags in ROUNDS.values())
    for row, record, line in zip(rows, as_json, as_csv, strict=True):
        assert record["id"] == row.row_id and record["round"] == row.round
        assert record["peer"] == fingerprint(row.entry.peer_public_key)
        assert bytes.fromhex(record["row_hash"]) == row.row_hash
        assert record["credit"] == row.entry.credit and record["time_s"] == row.entry.time_s
        assert record["accepted"] is row.entry.accepted and record["check"] == row.entry.check
        assert float(line["time_s"]) == row.entry.time_s and line["detail"] == row.entry.detail
        assert line["update_digest"] == row.entry.update_digest.hex()


def test_exporting_an_unknown_format_is_refused(tmp_path: Path) -> None:
    path = fill_ledger(tmp_path)
    with Ledger.open(path) as ledger, pytest.raises(ValueError, match="'csv' or 'json'"):
        export_rows(ledger, "xml")  # type: ignore[arg-type]


def test_a_read_only_ledger_reads_everything_and_refuses_to_append(tmp_path: Path) -> None:
    # Prepare
    path = fill_ledger(tmp_path)
    before = path.read_bytes()
    # Execute
    with Ledger.open(path, read_only=True) as reader:
        rows, counts = reader.rows(), reader.accepted_counts()
        with pytest.raises(LedgerError, match="nothing of it was written"):
            reader.append_round(round_index=99, entries=[entry(99)], identity=AGGREGATOR)
    # Assert
    assert len(rows) == 9 and sum(counts.values()) == 7
    assert path.read_bytes() == before
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger.open(tmp_path / "missing.sqlite", read_only=True)
