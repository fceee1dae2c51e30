"""The contribution ledger: one hash-chained row per received update, one signed head per round, in SQLite.

Every update the aggregator receives, accepted or not, becomes a row. Each row's hash covers its
fields and the previous row's hash, so the rows form one chain; after each round the aggregator
signs a head naming the chain's last row and hash (`ledger_format` defines the bytes;
`ledger_verify` checks them). `append_round` writes a round's rows and head in one durable
transaction, and the aggregator calls it before it publishes the round's aggregate, so nothing is
announced that the ledger could lose.

The file is SQLite in WAL mode (readers never block the one writer and see whole rounds only),
marked as ours by PRAGMA application_id, with synchronous=FULL so a commit survives a power cut.
"""

import csv
import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from potluck.errors import PotluckError
from potluck.incentives.ledger_format import (
    GENESIS_HASH,
    HEAD_COLUMNS,
    ROW_COLUMNS,
    LedgerEntry,
    LedgerRow,
    SignedHead,
    head_from_values,
    head_values,
    row_from_values,
    row_hash,
    row_values,
    sign_head,
)
from potluck.protocol.identity import Identity, fingerprint

_APPLICATION_ID = 0x504C4C47  # "PLLG": SQLite's PRAGMA application_id, marks the file as a potluck ledger
_SCHEMA_VERSION = 1  # PRAGMA user_version
_BUSY_TIMEOUT_S = 10.0  # how long a second writer, or a reader during a checkpoint, waits for the lock
_MAX_INT = 2**63 - 1  # SQLite INTEGER is int64
_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, peer_public_key BLOB NOT NULL,
    tokens_claimed INTEGER NOT NULL, weight REAL NOT NULL, credit REAL NOT NULL, accepted INTEGER NOT NULL,
    check_name TEXT NOT NULL, detail TEXT NOT NULL, payload_sha256 BLOB NOT NULL, update_digest BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL, time_s REAL NOT NULL, prev_hash BLOB NOT NULL, row_hash BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS updates_by_peer ON updates (peer_public_key);
CREATE INDEX IF NOT EXISTS updates_by_round ON updates (round);
CREATE TABLE IF NOT EXISTS heads (
    round INTEGER PRIMARY KEY, last_row_id INTEGER NOT NULL, head_hash BLOB NOT NULL, row_count INTEGER NOT NULL,
    timestamp_s REAL NOT NULL, aggregator_public_key BLOB NOT NULL, signature BLOB NOT NULL);
"""
SELECT_ROWS = f"SELECT {', '.join(ROW_COLUMNS)} FROM updates"
SELECT_HEADS = f"SELECT {', '.join(HEAD_COLUMNS)} FROM heads ORDER BY round"
_INSERT_ROW = f"INSERT INTO updates ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * len(ROW_COLUMNS))})"
_INSERT_HEAD = f"INSERT INTO heads ({', '.join(HEAD_COLUMNS)}) VALUES ({', '.join('?' * len(HEAD_COLUMNS))})"


class LedgerError(PotluckError):
    """The ledger file cannot be opened, read or written (one line, with the fix)."""


def connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    """A connection to the ledger at `path`, checked to be one (LedgerError otherwise), in autocommit mode.

    Read-only: the file must exist and is never changed. Otherwise a missing or empty file (and its
    directory) is created as a new ledger, and the connection commits with synchronous=FULL.
    """
    try:
        if read_only:
            if not path.is_file():
                raise LedgerError(f"no ledger at {path}; check the path")
            uri = path.resolve().as_uri() + "?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        raise LedgerError(f"cannot open ledger {path} ({e}); check the path and its permissions") from e
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if not read_only and app_id == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            db.execute("PRAGMA journal_mode=WAL")  # an empty file: make it a ledger
            pragmas = f"PRAGMA application_id={_APPLICATION_ID}; PRAGMA user_version={_SCHEMA_VERSION};"
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} {pragmas} COMMIT;")
            app_id = _APPLICATION_ID
        if app_id != _APPLICATION_ID:
            raise LedgerError(f"{path} is an SQLite file but not a potluck ledger; pass a ledger or a new path")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != _SCHEMA_VERSION:
            raise LedgerError(f"{path} is a v{version} ledger; this potluck reads v{_SCHEMA_VERSION}, upgrade it")
        if not read_only:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        return db
    except sqlite3.OperationalError as e:
        db.close()
        raise LedgerError(f"cannot use ledger {path} ({e}); check its permissions, or stop its other writer") from e
    except sqlite3.DatabaseError as e:
        db.close()
        raise LedgerError(f"{path} is not a potluck ledger ({e}); pass a ledger or a new path") from e
    except BaseException:
        db.close()
        raise


class Ledger:
    """An open ledger: the one writer of its file. Readers (verify_ledger, other processes) may read alongside."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = db
        self._lock = threading.Lock()  # one statement at a time, whichever thread calls

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> "Ledger":
        """Open the ledger at `path`, creating it (and its directory) if missing; LedgerError if it is not one.

        `read_only`: a reader beside the writer (the CLI); the file must exist and appending fails.
        """
        path = Path(path)
        return cls(path, connect(path, read_only=read_only))

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent); everything appended is already on disk."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _open_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerError(f"ledger {self.path} is closed; open it again with Ledger.open")
        return self._db

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._open_db().execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise LedgerError(f"cannot read ledger {self.path} ({e}); check the file with verify_ledger") from e

    def append_round(
        self, *, round_index: int, entries: Sequence[LedgerEntry], identity: Identity, timestamp_s: float | None = None
    ) -> SignedHead:
        """Record a round's entries and its head signed by `identity`, durably: all of it, or (raising) none of it.

        Rounds are appended once each, in increasing order, all signed by the same aggregator key.
        `timestamp_s` (default: now) is the head's time.
        """
        if type(round_index) is not int or not 0 <= round_index <= _MAX_INT:
            raise ValueError(f"round_index must be an integer in [0, 2^63), got {round_index!r:.40}")
        if not all(isinstance(entry, LedgerEntry) for entry in entries):
            raise TypeError("append_round records LedgerEntry objects only")
        with self._lock:
            db = self._open_db()
            try:
                db.execute("BEGIN IMMEDIATE")  # take the write lock before reading the chain's tip
                try:
                    head = self._append(db, round_index, entries, identity, timestamp_s)
                    db.execute("COMMIT")  # synchronous=FULL: on disk once this returns
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise LedgerError(
                    f"cannot append round {round_index} to ledger {self.path} ({e}); nothing of it was written"
                ) from e
        return head

    def _append(
        self,
        db: sqlite3.Connection,
        round_index: int,
        entries: Sequence[LedgerEntry],
        identity: Identity,
        timestamp_s: float | None,
    ) -> SignedHead:
        last = db.execute("SELECT round, aggregator_public_key FROM heads ORDER BY round DESC LIMIT 1").fetchone()
        if last is not None and round_index <= last[0]:
            raise LedgerError(f"ledger {self.path} already has round {last[0]}; append each round once, in order")
        if last is not None and last[1] != identity.public_key:
            raise LedgerError(
                f"ledger {self.path} is signed by aggregator {fingerprint(last[1])}, not {identity.fingerprint}; "
                "use that aggregator's key or a new ledger"
            )
        tip = db.execute("SELECT id, row_hash FROM updates ORDER BY id DESC LIMIT 1").fetchone()
        row_id, prev_hash = tip if tip is not None else (0, GENESIS_HASH)
        for entry in entries:
            row_id += 1
            digest = row_hash(row_id=row_id, round_index=round_index, entry=entry, prev_hash=prev_hash)
            row = LedgerRow(row_id=row_id, round=round_index, entry=entry, prev_hash=prev_hash, row_hash=digest)
            db.execute(_INSERT_ROW, row_values(row))
            prev_hash = digest
        head = sign_head(
            round_index=round_index,
            last_row_id=row_id,
            head_hash=prev_hash,
            row_count=len(entries),
            timestamp_s=time.time() if timestamp_s is None else timestamp_s,
            identity=identity,
        )
        db.execute(_INSERT_HEAD, head_values(head))
        return head

    def rows(self, *, round_index: int | None = None, peer_public_key: bytes | None = None) -> list[LedgerRow]:
        """The rows in chain order; only one round's and/or one peer's when given."""
        where = {"round = ?": round_index, "peer_public_key = ?": peer_public_key}
        where = {clause: value for clause, value in where.items() if value is not None}
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        values = self._query(f"{SELECT_ROWS}{condition} ORDER BY id", list(where.values()))
        try:
            return [row_from_values(v) for v in values]
        except ValueError as e:
            raise LedgerError(f"ledger {self.path} holds a malformed row ({e}); check it with verify_ledger") from e

    def heads(self) -> list[SignedHead]:
        """Every round's signed head, oldest first."""
        try:
            return [head_from_values(v) for v in self._query(SELECT_HEADS)]
        except ValueError as e:
            raise LedgerError(f"ledger {self.path} holds a malformed head ({e}); check it with verify_ledger") from e

    def head(self) -> SignedHead | None:
        """The latest round's signed head; None before the first round."""
        values = self._query(f"{SELECT_HEADS} DESC LIMIT 1")
        try:
            return head_from_values(values[0]) if values else None
        except ValueError as e:
            raise LedgerError(f"ledger {self.path} holds a malformed head ({e}); check it with verify_ledger") from e

    def points(self) -> dict[bytes, float]:
        """Total credit per peer key, highest first (a peer with only rejected updates has 0)."""
        sql = "SELECT peer_public_key, sum(credit) FROM updates GROUP BY peer_public_key ORDER BY 2 DESC, 1"
        return {key: float(total) for key, total in self._query(sql)}

    def recent_weights(self, peer_public_key: bytes, *, limit: int = 16) -> list[float]:
        """The aggregation weights of the peer's last `limit` accepted updates, newest first: its claim history."""
        sql = "SELECT weight FROM updates WHERE peer_public_key = ? AND accepted ORDER BY id DESC LIMIT ?"
        return [float(weight) for (weight,) in self._query(sql, (peer_public_key, limit))]

    def accepted_counts(self) -> dict[bytes, int]:
        """How many accepted updates each peer key has (keys with none are left out)."""
        sql = "SELECT peer_public_key, count(*) FROM updates WHERE accepted GROUP BY peer_public_key"
        return {key: int(count) for key, count in self._query(sql)}


# Columns of an export: the stored ones, with check_name as check and the peer's fingerprint added.
EXPORT_FIELDS = (
    "id", "round", "peer", "peer_public_key", "tokens_claimed", "weight", "credit", "accepted", "check", "detail",
    "payload_sha256", "update_digest", "payload_bytes", "time_s", "prev_hash", "row_hash",
)  # fmt: skip


def _export_record(row: LedgerRow) -> dict[str, Any]:
    e = row.entry
    return {
        "id": row.row_id,
        "round": row.round,
        "peer": fingerprint(e.peer_public_key),
        "peer_public_key": e.peer_public_key.hex(),
        "tokens_claimed": e.tokens_claimed,
        "weight": e.weight,
        "credit": e.credit,
        "accepted": e.accepted,
        "check": e.check,
        "detail": e.detail,
        "payload_sha256": e.payload_sha256.hex(),
        "update_digest": e.update_digest.hex(),
        "payload_bytes": e.payload_bytes,
        "time_s": e.time_s,
        "prev_hash": row.prev_hash.hex(),
        "row_hash": row.row_hash.hex(),
    }


def export_rows(ledger: Ledger, fmt: Literal["csv", "json"]) -> str:
    """Every row as CSV (a header line, then one line per row) or a JSON array; bytes as lowercase hex.

    Floats are written exactly (shortest repr), and the hashes are included, so an export can be
    checked against the chain with `ledger_format.row_hash`.
    """
    if fmt not in ("csv", "json"):
        raise ValueError(f"export format must be 'csv' or 'json', got {fmt!r:.40}")
    records = [_export_record(row) for row in ledger.rows()]
    if fmt == "json":
        return json.dumps(records, indent=1)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()
