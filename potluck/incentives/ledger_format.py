"""What a ledger row and a round's signed head are, and the exact bytes that are hashed and signed.

Pure values and functions, no storage: the ledger writes with them and every verifier checks with
them, so there is one definition of the chain. `row_hash` documents the row encoding; a head is
signed as `b"potluck/ledger-head/v1\\0"` + round, last_row_id, row_count (uint64), timestamp_s
(float64), head_hash and aggregator_public_key (32 bytes each), all big-endian and fixed width.
Never change an encoding in place: bump the domain tag's version instead.
"""

import dataclasses
import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from potluck.protocol.envelope import MAX_REASON_CHARS
from potluck.protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify_signature

HASH_BYTES = 32
GENESIS_HASH = bytes(HASH_BYTES)  # the first row's prev_hash
MAX_CHECK_CHARS = 64
# The stored columns in order (`check` is stored as check_name: CHECK is an SQL keyword).
ROW_COLUMNS = (
    "id", "round", "peer_public_key", "tokens_claimed", "weight", "credit", "accepted", "check_name", "detail",
    "payload_sha256", "update_digest", "payload_bytes", "time_s", "prev_hash", "row_hash",
)  # fmt: skip
HEAD_COLUMNS = ("round", "last_row_id", "head_hash", "row_count", "timestamp_s", "aggregator_public_key", "signature")
_ROW_DOMAIN = b"potluck/ledger-row/v1\0"
_HEAD_DOMAIN = b"potluck/ledger-head/v1\0"
_MAX_INT = 2**63 - 1  # SQLite INTEGER is int64


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT


def _is_real(value: Any) -> bool:
    if type(value) is int:  # ints below 2^53 convert to float exactly; bool is not a number here
        return 0 <= value < 2**53
    return type(value) is float and math.isfinite(value) and value >= 0


def _is_bytes(length: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, bytes) and len(value) == length


def _is_text(max_chars: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and len(value) <= max_chars and value.isprintable()


_COUNT = (_is_count, "an integer in [0, 2^63)")
_REAL = (_is_real, "a finite number >= 0")
_HASH = (_is_bytes(HASH_BYTES), f"a {HASH_BYTES}-byte hash")
_KEY = (_is_bytes(PUBLIC_KEY_BYTES), f"a raw {PUBLIC_KEY_BYTES}-byte Ed25519 public key")
# One rule per field name, shared by entries, rows and heads.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peer_public_key": _KEY,
    "tokens_claimed": _COUNT,
    "weight": _REAL,
    "credit": _REAL,
    "accepted": (lambda v: type(v) is bool, "True or False"),
    "check": (_is_text(MAX_CHECK_CHARS), f"printable text of at most {MAX_CHECK_CHARS} characters"),
    "detail": (_is_text(MAX_REASON_CHARS), f"printable text of at most {MAX_REASON_CHARS} characters"),
    "payload_sha256": _HASH,
    "update_digest": _HASH,
    "payload_bytes": _COUNT,
    "time_s": _REAL,
    "row_id": (lambda v: _is_count(v) and v >= 1, "an integer in [1, 2^63)"),
    "round": _COUNT,
    "entry": (lambda v: isinstance(v, LedgerEntry), "a LedgerEntry"),
    "prev_hash": _HASH,
    "row_hash": _HASH,
    "last_row_id": _COUNT,
    "head_hash": _HASH,
    "row_count": _COUNT,
    "timestamp_s": _REAL,
    "aggregator_public_key": _KEY,
    "signature": (_is_bytes(SIGNATURE_BYTES), f"a {SIGNATURE_BYTES}-byte Ed25519 signature"),
}


def _validate(obj: Any) -> None:
    """ValueError naming the first field that breaks its rule; numbers are stored as floats with one zero."""
    for field in fields(obj):
        is_valid, expected = _RULES[field.name]
        value = getattr(obj, field.name)
        if not is_valid(value):
            raise ValueError(f"{type(obj).__name__}.{field.name} must be {expected}, got {value!r:.60}")
        if is_valid is _is_real:
            object.__setattr__(obj, field.name, float(value) + 0.0)  # -0.0 becomes 0.0: SQLite keeps no -0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerEntry:
    """What the aggregator decided about one received update: what `Ledger.append_round` records."""

    peer_public_key: bytes  # who signed the update
    tokens_claimed: int  # UpdateHeader.tokens, as claimed
    weight: float  # the aggregation weight the update was given
    credit: float  # points credited (scoring.credit); 0 when rejected
    accepted: bool
    check: str = ""  # the check that rejected it; "" when accepted
    detail: str = ""  # why, for humans
    payload_sha256: bytes
    update_digest: bytes  # UpdateHeader.digest(): names the upload, and is its Merkle leaf
    payload_bytes: int
    time_s: float  # when it was received (Unix seconds)

    def __post_init__(self) -> None:
        _validate(self)
        if self.accepted and self.check:
            raise ValueError(f"an accepted update has no rejecting check, got check={self.check!r}")
        if not self.accepted and not (self.check and self.credit == 0):
            raise ValueError("a rejected update names its rejecting check and earns 0 credit")


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerRow:
    """One stored row: an entry at its place in the chain. Construction checks types, not hashes."""

    row_id: int  # 1, 2, 3, ... with no gaps
    round: int
    entry: LedgerEntry
    prev_hash: bytes  # the previous row's row_hash; GENESIS_HASH for row 1
    row_hash: bytes  # row_hash(...) of all of the above

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedHead:
    """The aggregator's signed statement of the chain after one round."""

    round: int
    last_row_id: int  # the chain's last row after this round (0 while there are none)
    head_hash: bytes  # that row's row_hash (GENESIS_HASH while there are none): commits to every row so far
    row_count: int  # rows this round added, ending at last_row_id
    timestamp_s: float  # when it was signed (Unix seconds)
    aggregator_public_key: bytes
    signature: bytes  # Ed25519 over signed_bytes() by aggregator_public_key

    def __post_init__(self) -> None:
        _validate(self)

    def signed_bytes(self) -> bytes:
        """Exactly what the signature covers (see the module docstring)."""
        numbers = struct.pack(">QQQd", self.round, self.last_row_id, self.row_count, self.timestamp_s)
        return _HEAD_DOMAIN + numbers + self.head_hash + self.aggregator_public_key

    def verify(self, aggregator_public_key: bytes) -> bool:
        """True if the head names `aggregator_public_key` and carries its valid signature."""
        key_matches = self.aggregator_public_key == aggregator_public_key
        return key_matches and verify_signature(aggregator_public_key, self.signature, self.signed_bytes())


def sign_head(
    *, round_index: int, last_row_id: int, head_hash: bytes, row_count: int, timestamp_s: float, identity: Identity
) -> SignedHead:
    """The head of a round, signed by the aggregator's `identity`."""
    unsigned = SignedHead(
        round=round_index,
        last_row_id=last_row_id,
        head_hash=head_hash,
        row_count=row_count,
        timestamp_s=timestamp_s,
        aggregator_public_key=identity.public_key,
        signature=bytes(SIGNATURE_BYTES),  # signed_bytes() leaves the signature out
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


def row_hash(*, row_id: int, round_index: int, entry: LedgerEntry, prev_hash: bytes) -> bytes:
    """sha256 of a row's canonical bytes: the one definition the ledger and every verifier share.

    Domain tag b"potluck/ledger-row/v1\\0", then in order: row_id, round (uint64), peer_public_key
    (32 bytes), tokens_claimed (uint64), weight, credit (float64), accepted (1 byte, 0 or 1), check,
    detail (each a uint32 byte length + UTF-8), payload_sha256, update_digest (32 bytes each),
    payload_bytes (uint64), time_s (float64), prev_hash (32 bytes); all big-endian. Only the two texts
    vary in length and both carry it, so two different rows never share an encoding.
    """
    check, detail = entry.check.encode(), entry.detail.encode()
    parts = [
        _ROW_DOMAIN,
        struct.pack(">QQ", row_id, round_index),
        entry.peer_public_key,
        struct.pack(">QddB", entry.tokens_claimed, entry.weight, entry.credit, entry.accepted),
        struct.pack(">I", len(check)) + check,
        struct.pack(">I", len(detail)) + detail,
        entry.payload_sha256,
        entry.update_digest,
        struct.pack(">Qd", entry.payload_bytes, entry.time_s),
        prev_hash,
    ]
    return hashlib.sha256(b"".join(parts)).digest()


def row_values(row: LedgerRow) -> tuple[Any, ...]:
    """The row as stored: one value per ROW_COLUMNS entry."""
    e = row.entry
    decision = (e.peer_public_key, e.tokens_claimed, e.weight, e.credit, e.accepted, e.check, e.detail)
    upload = (e.payload_sha256, e.update_digest, e.payload_bytes, e.time_s)
    return (row.row_id, row.round, *decision, *upload, row.prev_hash, row.row_hash)


def row_from_values(values: Sequence[Any]) -> LedgerRow:
    """The row whose stored values (in ROW_COLUMNS order) are `values`; ValueError if any is malformed."""
    if len(values) != len(ROW_COLUMNS):
        raise ValueError(f"a ledger row has {len(ROW_COLUMNS)} values, got {len(values)}")
    named = dict(zip(ROW_COLUMNS, values, strict=True))
    named["check"] = named.pop("check_name")
    if type(named["accepted"]) is int and named["accepted"] in (0, 1):  # SQLite stores booleans as 0 and 1
        named["accepted"] = bool(named["accepted"])
    row_id, round_index, prev_hash, digest = (named.pop(name) for name in ("id", "round", "prev_hash", "row_hash"))
    entry = LedgerEntry(**named)
    return LedgerRow(row_id=row_id, round=round_index, entry=entry, prev_hash=prev_hash, row_hash=digest)


def head_values(head: SignedHead) -> tuple[Any, ...]:
    """The head as stored: one value per HEAD_COLUMNS entry."""
    return tuple(getattr(head, name) for name in HEAD_COLUMNS)


def head_from_values(values: Sequence[Any]) -> SignedHead:
    """The head whose stored values (in HEAD_COLUMNS order) are `values`; ValueError if any is malformed."""
    if len(values) != len(HEAD_COLUMNS):
        raise ValueError(f"a ledger head has {len(HEAD_COLUMNS)} values, got {len(values)}")
    return SignedHead(**dict(zip(HEAD_COLUMNS, values, strict=True)))
