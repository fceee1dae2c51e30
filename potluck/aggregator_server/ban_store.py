"""Where strikes and bans live: one SQLite file in the state dir, appended to by a writer thread.

A strike is one inserted row and a ban one upserted row, never a rewrite of the whole record, and every
write goes through one daemon thread with its own connection, so the event loop that judged the upload
never waits on a disk. The file is in WAL mode: `potluck bans` (another process) reads and writes it
beside a running aggregator, whose reader connection notices such a commit by `PRAGMA data_version`
(one cheap query per upload) and reloads.
"""

import logging
import queue
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potluck.errors import PotluckError

logger = logging.getLogger(__name__)

_APPLICATION_ID = 0x504C424E  # "PLBN": SQLite's PRAGMA application_id, marks the file as a potluck ban store
_SCHEMA_VERSION = 1  # PRAGMA user_version
_BUSY_TIMEOUT_S = 10.0  # how long a writer waits for the other process's write lock (`potluck bans`)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    public_key BLOB PRIMARY KEY, reason TEXT NOT NULL, round INTEGER NOT NULL, at_s REAL NOT NULL, issuer BLOB);
CREATE TABLE IF NOT EXISTS strikes (
    id INTEGER PRIMARY KEY, public_key BLOB NOT NULL, round INTEGER NOT NULL, check_name TEXT NOT NULL,
    at_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS strikes_by_key ON strikes (public_key);
CREATE INDEX IF NOT EXISTS strikes_by_round ON strikes (round);
"""

Statement = tuple[str, Sequence[Any]]


class BanFileError(PotluckError):
    """The ban store cannot be read or written (one line, with the fix)."""


def _connect(path: Path) -> sqlite3.Connection:
    """A connection to the ban store at `path` (created when missing), checked to be one, in autocommit mode."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        raise BanFileError(f"cannot open the ban store {path} ({e}); check the path and its permissions") from e
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if app_id == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            db.execute("PRAGMA journal_mode=WAL")  # an empty file: make it a ban store
            pragmas = f"PRAGMA application_id={_APPLICATION_ID}; PRAGMA user_version={_SCHEMA_VERSION};"
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} {pragmas} COMMIT;")
            app_id = _APPLICATION_ID
        if app_id != _APPLICATION_ID:
            raise BanFileError(f"{path} is an SQLite file but not a potluck ban store; move it away")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != _SCHEMA_VERSION:
            raise BanFileError(f"{path} is a v{version} ban store; this potluck reads v{_SCHEMA_VERSION}, upgrade it")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a ban, once written, survives a power cut
        return db
    except sqlite3.DatabaseError as e:
        db.close()
        raise BanFileError(f"{path} is not a readable ban store ({e}); fix it or move it away") from e
    except BaseException:
        db.close()
        raise


class BanStore:
    """The open ban store: reads on the caller's thread, writes queued to one writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = _connect(path)
        self._read_lock = threading.Lock()  # the reader is used from the event loop and the closing thread
        self._seen_version: int | None = None  # PRAGMA data_version when last loaded
        self._queue: queue.Queue[list[Statement] | None] = queue.Queue()
        self._pending = 0  # batches queued and not yet committed (or failed)
        self._pending_lock = threading.Lock()
        self._error: str | None = None  # the last failed write since the last flush
        self._writer: threading.Thread | None = None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read, on the caller's thread (every committed write is in them)."""
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise BanFileError(f"cannot read the ban store {self.path} ({e}); fix it or move it away") from e

    def mark_loaded(self) -> None:
        """Remember the store's version as the one the caller holds in memory (see `changed`)."""
        self._seen_version = self.query("PRAGMA data_version")[0][0]

    def changed(self) -> bool:
        """Whether a commit since `mark_loaded` may have changed the store (another process's or ours).

        False while our own writes are queued: the caller's memory is ahead of the file until they land.
        """
        with self._pending_lock:
            if self._pending:
                return False
        return self.query("PRAGMA data_version")[0][0] != self._seen_version

    def write(self, statements: list[Statement]) -> None:
        """Commit `statements` in one transaction on the writer thread, soon; this returns at once."""
        with self._pending_lock:
            self._pending += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_forever, name="ban-store", daemon=True)
                self._writer.start()
        self._queue.put(statements)

    def flush(self) -> None:
        """Wait until every queued write is committed; BanFileError if one failed since the last flush."""
        self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise BanFileError(f"cannot write the ban store {self.path} ({error}); free disk space or fix permissions")

    def close(self) -> None:
        """Commit what is queued, stop the writer thread and close the file (idempotent)."""
        writer = self._writer
        if writer is not None:
            self._queue.put(None)
            writer.join()
            self._writer = None
        with self._read_lock:
            self._reader.close()
        error, self._error = self._error, None
        if error is not None:
            logger.error("the ban store %s missed a write: %s", self.path, error)

    def _write_forever(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while True:
                statements = self._queue.get()
                try:
                    if statements is None:
                        return
                    if db is None:
                        db = _connect(self.path)
                    self._commit(db, statements)
                except BanFileError as e:  # the file cannot be opened: this batch is lost, the next tries again
                    self._error = str(e)
                    logger.error("%s", e)
                finally:
                    with self._pending_lock:
                        self._pending -= statements is not None
                    self._queue.task_done()
        finally:
            if db is not None:
                db.close()

    def _commit(self, db: sqlite3.Connection, statements: list[Statement]) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    db.execute(sql, params)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self._error = str(e)
            logger.error("could not write to the ban store %s: %s", self.path, e)
