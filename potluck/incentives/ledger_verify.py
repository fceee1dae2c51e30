"""Check a ledger file against its own hashes and the aggregator's signed heads, and name the first fault.

The walk goes row by row in id order, and closes each round at its signed head:

- a deleted row leaves a gap in the ids, or falls short of its round's head (MISSING_ROW);
- an edited row no longer matches its hash (ROW_HASH); if the editor also recomputed that hash, the
  next row's link breaks (BROKEN_LINK) or the round's head no longer matches (HEAD_MISMATCH);
- inserted or reordered rows break a link (BROKEN_LINK), sit inside another round's span
  (MISPLACED_ROW) or come after the last signed head (UNSIGNED_ROW);
- an edited head fails its signature (HEAD_SIGNATURE), or names another aggregator (HEAD_KEY).

A head is checked for its key and signature before it is compared with the chain, so a mismatch
between an authentic head and the rows means the rows changed. Dropping whole rounds from the end
(rows and heads) leaves a shorter ledger that verifies; catching that needs a head kept outside the
file, e.g. one the aggregator published.
"""

import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from potluck.incentives.ledger import SELECT_HEADS, SELECT_ROWS, LedgerError, connect
from potluck.incentives.ledger_format import GENESIS_HASH, SignedHead, head_from_values, row_from_values, row_hash
from potluck.protocol.identity import PUBLIC_KEY_BYTES, fingerprint


class Problem(str, Enum):
    """What is wrong with the first bad row or head."""

    MISSING_ROW = "missing row"
    MALFORMED_ROW = "malformed row"
    BROKEN_LINK = "broken link"
    ROW_HASH = "row hash mismatch"
    MISPLACED_ROW = "row outside its round"
    UNSIGNED_ROW = "row not covered by a signed head"
    MALFORMED_HEAD = "malformed head"
    HEAD_KEY = "head names another aggregator"
    HEAD_SIGNATURE = "head signature invalid"
    HEAD_MISMATCH = "head does not match the chain"


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyReport:
    """The outcome of verify_ledger: ok, or the first fault in chain order."""

    ok: bool
    rows_checked: int  # rows found good before the first fault (all of them when ok)
    heads_checked: int  # heads found good before the first fault (all of them when ok)
    problem: Problem | None = None
    row_id: int | None = None  # the bad (or missing) row, when the fault is a row's
    round: int | None = None  # the bad head's round, or the round whose span holds the bad row
    message: str = ""  # one line for humans; "" when ok


# (problem, row id or None, message)
_Fault = tuple[Problem, int | None, str]


def _check_row(values: Sequence[Any], *, tip_id: int, tip_hash: bytes, round_index: int) -> _Fault | None:
    """The fault of the row after row `tip_id` (hash `tip_hash`) in round `round_index`'s span, if any."""
    row_id = values[0]
    if row_id != tip_id + 1:
        if row_id < tip_id + 1:
            return Problem.MALFORMED_ROW, row_id, f"row {row_id} has an id below 1; ids count from 1"
        return Problem.MISSING_ROW, tip_id + 1, f"row {tip_id + 1} is missing: the chain jumps to row {row_id}"
    try:
        row = row_from_values(values)
    except ValueError as e:
        return Problem.MALFORMED_ROW, row_id, f"row {row_id} is malformed: {e}"
    if row.prev_hash != tip_hash:
        link = f"row {tip_id}'s hash" if tip_id else "the genesis hash"
        reason = "rows were inserted, deleted or reordered, or its prev_hash edited"
        return Problem.BROKEN_LINK, row_id, f"row {row_id}'s prev_hash is not {link}: {reason}"
    if row_hash(row_id=row_id, round_index=row.round, entry=row.entry, prev_hash=row.prev_hash) != row.row_hash:
        return Problem.ROW_HASH, row_id, f"row {row_id}'s contents do not match its row_hash: the row was edited"
    if row.round != round_index:
        message = f"row {row_id} is in round {row.round} but inside round {round_index}'s span"
        return Problem.MISPLACED_ROW, row_id, message
    return None


def _check_head(head: SignedHead, *, tip_id: int, tip_hash: bytes, count: int, key: bytes) -> _Fault | None:
    """The fault of `head` against the chain walked so far (ending at row `tip_id`, `count` rows this round)."""
    r = head.round
    if head.aggregator_public_key != key:
        signer = fingerprint(head.aggregator_public_key)
        return Problem.HEAD_KEY, None, f"the head of round {r} names {signer}, not the aggregator {fingerprint(key)}"
    if not head.verify(key):
        return Problem.HEAD_SIGNATURE, None, f"the head of round {r} fails its signature: edited after signing"
    if head.last_row_id > tip_id:
        message = f"row {tip_id + 1} is missing: the signed head of round {r} ends at row {head.last_row_id}"
        return Problem.MISSING_ROW, tip_id + 1, message
    if (head.last_row_id, head.head_hash, head.row_count) != (tip_id, tip_hash, count):
        signed = f"{head.row_count} rows up to row {head.last_row_id} (hash {head.head_hash.hex()[:16]})"
        found = f"{count} rows up to row {tip_id} (hash {tip_hash.hex()[:16]})"
        return Problem.HEAD_MISMATCH, None, f"the signed head of round {r} says {signed}, the chain has {found}"
    return None


def _failed(fault: _Fault, *, rows_ok: int, heads_ok: int, round_index: int | None) -> VerifyReport:
    problem, row_id, message = fault
    return VerifyReport(
        ok=False,
        rows_checked=rows_ok,
        heads_checked=heads_ok,
        problem=problem,
        row_id=row_id,
        round=round_index,
        message=message,
    )


def _walk(rows: Iterator[Sequence[Any]], heads: Sequence[Sequence[Any]], key: bytes) -> VerifyReport:
    """Check `rows` (in id order) against `heads` (in round order); both as stored."""
    tip_id, tip_hash, rows_ok = 0, GENESIS_HASH, 0
    pending = next(rows, None)
    for heads_ok, values in enumerate(heads):
        round_index = values[0]
        try:
            head = head_from_values(values)
        except ValueError as e:
            malformed = (Problem.MALFORMED_HEAD, None, f"the head of round {round_index} is malformed: {e}")
            return _failed(malformed, rows_ok=rows_ok, heads_ok=heads_ok, round_index=round_index)
        count = 0
        while pending is not None and pending[0] <= head.last_row_id:
            fault = _check_row(pending, tip_id=tip_id, tip_hash=tip_hash, round_index=round_index)
            if fault is not None:
                return _failed(fault, rows_ok=rows_ok, heads_ok=heads_ok, round_index=round_index)
            tip_id, tip_hash, count, rows_ok = pending[0], pending[-1], count + 1, rows_ok + 1
            pending = next(rows, None)
        fault = _check_head(head, tip_id=tip_id, tip_hash=tip_hash, count=count, key=key)
        if fault is not None:
            return _failed(fault, rows_ok=rows_ok, heads_ok=heads_ok, round_index=round_index)
    if pending is not None:
        row_id = pending[0]
        message = f"row {row_id} comes after the last signed head: added outside append_round, or its head deleted"
        fault = (Problem.UNSIGNED_ROW, row_id, message)
        return _failed(fault, rows_ok=rows_ok, heads_ok=len(heads), round_index=None)
    return VerifyReport(ok=True, rows_checked=rows_ok, heads_checked=len(heads))


def verify_ledger(path: str | os.PathLike[str], aggregator_public_key: bytes) -> VerifyReport:
    """Walk the ledger at `path` and report ok or its first fault; every head must be `aggregator_public_key`'s.

    Read-only and safe beside a running aggregator: it reads one consistent snapshot. LedgerError when
    the file is missing or not a ledger; ValueError when the key is not a raw 32-byte public key.
    """
    if not (isinstance(aggregator_public_key, bytes) and len(aggregator_public_key) == PUBLIC_KEY_BYTES):
        raise ValueError(f"aggregator_public_key is {PUBLIC_KEY_BYTES} raw bytes, got {aggregator_public_key!r:.80}")
    path = Path(path)
    db = connect(path, read_only=True)
    try:
        db.execute("BEGIN")  # one snapshot for both tables, even while the aggregator appends
        heads = db.execute(SELECT_HEADS).fetchall()
        return _walk(iter(db.execute(f"{SELECT_ROWS} ORDER BY id")), heads, aggregator_public_key)
    except sqlite3.Error as e:
        raise LedgerError(f"cannot read ledger {path} ({e}); check the file's permissions") from e
    finally:
        db.close()
