"""Ledger rows and heads as values: validation, the row-hash encoding, and what a head's signature covers."""

import dataclasses
import hashlib
import struct
from typing import Any

import pytest

from potluck.incentives.ledger_format import (
    GENESIS_HASH,
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
from tests.incentives.ledger_helpers import AGGREGATOR, entry

ENTRY = LedgerEntry(
    peer_public_key=bytes(range(32)),
    tokens_claimed=4096,
    weight=0.5,
    credit=2048.0,
    accepted=True,
    payload_sha256=bytes([1]) * 32,
    update_digest=bytes([2]) * 32,
    payload_bytes=12_345,
    time_s=1_700_000_000.25,
)
# Pinned: the encoding is the ledger's format, and every existing ledger's hashes depend on it.
ENTRY_HASH = "900697effe2df9ab17502c5398d9fc06b7782d73c9806daf22cb5010e32a20e0"


def test_the_row_hash_is_pinned() -> None:
    assert row_hash(row_id=7, round_index=3, entry=ENTRY, prev_hash=GENESIS_HASH).hex() == ENTRY_HASH


def test_the_row_hash_is_the_documented_encoding() -> None:
    # Prepare: the docstring's encoding, written out again
    e = entry(4, accepted=False)
    check, detail = e.check.encode(), e.detail.encode()
    prev = bytes([9]) * 32
    encoded = (
        b"potluck/ledger-row/v1\0"
        + struct.pack(">QQ", 2, 1)
        + e.peer_public_key
        + struct.pack(">QddB", e.tokens_claimed, e.weight, e.credit, 0)
        + struct.pack(">I", len(check))
        + check
        + struct.pack(">I", len(detail))
        + detail
        + e.payload_sha256
        + e.update_digest
        + struct.pack(">Qd", e.payload_bytes, e.time_s)
        + prev
    )
    # Execute / Assert
    assert row_hash(row_id=2, round_index=1, entry=e, prev_hash=prev) == hashlib.sha256(encoded).digest()


@pytest.mark.parametrize(
    "change",
    [
        {"peer_public_key": bytes(32)},
        {"tokens_claimed": 4097},
        {"weight": 0.25},
        {"credit": 2047.5},
        {"accepted": False, "check": "norm", "credit": 0.0},
        {"detail": "a note"},
        {"payload_sha256": bytes(32)},
        {"update_digest": bytes(32)},
        {"payload_bytes": 12_346},
        {"time_s": 1_700_000_000.5},
    ],
    ids=lambda change: "+".join(change),
)
def test_the_row_hash_covers_every_field(change: dict[str, Any]) -> None:
    # Prepare
    base = row_hash(row_id=7, round_index=3, entry=ENTRY, prev_hash=GENESIS_HASH)
    # Execute
    changed = row_hash(row_id=7, round_index=3, entry=dataclasses.replace(ENTRY, **change), prev_hash=GENESIS_HASH)
    # Assert
    assert changed != base


def test_the_row_hash_covers_position_and_link() -> None:
    hashes = {
        row_hash(row_id=7, round_index=3, entry=ENTRY, prev_hash=GENESIS_HASH),
        row_hash(row_id=8, round_index=3, entry=ENTRY, prev_hash=GENESIS_HASH),
        row_hash(row_id=7, round_index=4, entry=ENTRY, prev_hash=GENESIS_HASH),
        row_hash(row_id=7, round_index=3, entry=ENTRY, prev_hash=bytes([1]) * 32),
    }
    assert len(hashes) == 4


def test_text_cannot_move_between_check_and_detail_unnoticed() -> None:
    # Prepare
    a = dataclasses.replace(ENTRY, accepted=False, credit=0.0, check="ab", detail="c")
    b = dataclasses.replace(ENTRY, accepted=False, credit=0.0, check="a", detail="bc")
    # Execute / Assert
    assert row_hash(row_id=1, round_index=0, entry=a, prev_hash=GENESIS_HASH) != row_hash(
        row_id=1, round_index=0, entry=b, prev_hash=GENESIS_HASH
    )


@pytest.mark.parametrize(
    "change",
    [
        {"peer_public_key": bytes(31)},
        {"peer_public_key": "00" * 32},
        {"tokens_claimed": -1},
        {"tokens_claimed": 2**63},
        {"tokens_claimed": True},
        {"tokens_claimed": 4096.0},
        {"weight": float("nan")},
        {"weight": -0.5},
        {"credit": float("inf")},
        {"credit": 2**53},
        {"accepted": 1},
        {"check": "norm"},
        {"accepted": False, "credit": 0.0},
        {"accepted": False, "check": "norm"},
        {"accepted": False, "check": "x" * 65, "credit": 0.0},
        {"detail": "two\nlines"},
        {"detail": "x" * 513},
        {"payload_sha256": bytes(33)},
        {"update_digest": None},
        {"payload_bytes": -5},
        {"time_s": float("-inf")},
    ],
    ids=lambda change: "+".join(f"{k}={v!r:.12}" for k, v in change.items()),
)
def test_an_invalid_entry_cannot_be_built(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(ENTRY, **change)


def test_numbers_are_stored_as_floats_with_one_zero() -> None:
    # Prepare / Execute: SQLite would hand back -0.0 as 0.0, and an int weight as a float
    e = dataclasses.replace(ENTRY, weight=-0.0, credit=3, time_s=0)
    # Assert
    assert (e.weight, e.credit, e.time_s) == (0.0, 3.0, 0.0)
    assert all(type(v) is float for v in (e.weight, e.credit, e.time_s))
    assert struct.pack(">d", e.weight) == bytes(8)


def test_rows_and_heads_survive_their_stored_form() -> None:
    # Prepare
    digest = row_hash(row_id=1, round_index=0, entry=ENTRY, prev_hash=GENESIS_HASH)
    row = LedgerRow(row_id=1, round=0, entry=ENTRY, prev_hash=GENESIS_HASH, row_hash=digest)
    head = sign_head(round_index=0, last_row_id=1, head_hash=digest, row_count=1, timestamp_s=2.0, identity=AGGREGATOR)
    # Execute
    stored = list(row_values(row))
    stored[6] = int(stored[6])  # SQLite hands booleans back as 0 / 1
    # Assert
    assert row_from_values(stored) == row
    assert head_from_values(head_values(head)) == head


def test_a_stored_row_with_a_wrong_type_is_refused() -> None:
    # Prepare
    digest = row_hash(row_id=1, round_index=0, entry=ENTRY, prev_hash=GENESIS_HASH)
    stored = list(row_values(LedgerRow(row_id=1, round=0, entry=ENTRY, prev_hash=GENESIS_HASH, row_hash=digest)))
    # Execute / Assert
    for index, wrong in [(0, 0), (1, "3"), (3, 4096.5), (6, 2), (13, b"short"), (14, None)]:
        with pytest.raises(ValueError):
            row_from_values(stored[:index] + [wrong] + stored[index + 1 :])
    with pytest.raises(ValueError, match="has 15 values"):
        row_from_values(stored[:-1])


@pytest.mark.parametrize(
    "change",
    [
        {"round": 1},
        {"last_row_id": 2},
        {"head_hash": bytes(32)},
        {"row_count": 2},
        {"timestamp_s": 2.5},
        {"aggregator_public_key": bytes(range(32))},
        {"signature": bytes(64)},
    ],
    ids=lambda change: "+".join(change),
)
def test_a_head_verifies_only_as_signed(change: dict[str, Any]) -> None:
    # Prepare
    head = sign_head(
        round_index=0, last_row_id=1, head_hash=bytes([5]) * 32, row_count=1, timestamp_s=2.0, identity=AGGREGATOR
    )
    assert head.verify(AGGREGATOR.public_key)
    # Execute
    changed = dataclasses.replace(head, **change)
    # Assert
    assert not changed.verify(AGGREGATOR.public_key)
    assert not changed.verify(change.get("aggregator_public_key", AGGREGATOR.public_key))


def test_a_head_does_not_verify_under_another_key() -> None:
    head = sign_head(
        round_index=0, last_row_id=0, head_hash=GENESIS_HASH, row_count=0, timestamp_s=0.0, identity=AGGREGATOR
    )
    assert not head.verify(bytes(range(32)))
    assert not head.verify(b"")


def test_an_invalid_head_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="signature"):
        SignedHead(
            round=0,
            last_row_id=0,
            head_hash=GENESIS_HASH,
            row_count=0,
            timestamp_s=0.0,
            aggregator_public_key=AGGREGATOR.public_key,
            signature=b"\x00" * 63,
        )
