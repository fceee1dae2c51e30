"""A volunteer's own record of its credited work: final receipts beside the signed aggregates, checked offline.

The peer keeps, per run, each final receipt (a SignedReceipt from the ledger) and the signed header of
the aggregate of the same round (without its payload: a few hundred bytes). `verify_receipts` checks,
with nothing but those files and the aggregator's public key, that each receipt is signed by that
aggregator, and that each accepted update's Merkle proof leads to the `updates_root` the same
aggregator signed in that round's aggregate: the aggregator cannot credit an update and leave it out
of the aggregate it published without leaving signed evidence of it.

Layout: ``<dir>/<run>/round-<round>-<digest prefix>.receipt`` and ``<dir>/<run>/aggregate-<round>.bin``,
each written atomically (temporary file, fsync, rename).
"""

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from potluck.errors import PotluckError
from potluck.incentives.merkle import proof_from_bytes, verify_proof
from potluck.protocol.envelope import (
    MAX_AGGREGATE_ENVELOPE_BYTES,
    MAX_RECEIPT_ENVELOPE_BYTES,
    EnvelopeError,
    SignedAggregate,
    SignedReceipt,
)
from potluck.protocol.identity import fingerprint

DEFAULT_RECEIPTS_DIR = Path("~/.potluck/receipts")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")  # a run name becomes a directory name
_RECEIPT = re.compile(r"round-(\d{8,})-[0-9a-f]{16}\.receipt")


class ReceiptError(PotluckError):
    """A receipt cannot be stored (one line, with the fix)."""


def _run_dir(root: Path, run_id: str) -> Path:
    return root / (_SAFE.sub("_", run_id) or "_")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_receipt(root: Path, receipt: SignedReceipt, aggregate: SignedAggregate) -> Path:
    """Keep a final receipt and its round's signed aggregate header under `root`; returns the receipt's path."""
    r = receipt.receipt
    if not r.is_final:
        raise ReceiptError("only final receipts (with a ledger row) are kept; this one answers an upload")
    directory = _run_dir(root.expanduser(), r.run_id)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"round-{r.round:08d}-{r.update_sha256.hex()[:16]}.receipt"
        _write_atomically(directory / f"aggregate-{aggregate.header.round:08d}.bin", aggregate.to_bytes())
        _write_atomically(path, receipt.to_bytes())
    except OSError as e:
        raise ReceiptError(
            f"cannot store a receipt in {directory} ({e.strerror}); check the disk or --receipts"
        ) from e
    return path


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptCheck:
    """What `verify_receipts` found about one stored receipt."""

    path: Path
    run_id: str | None
    round: int | None
    accepted: bool
    tokens_credited: int
    score: float
    aggregator: str | None  # fingerprint of the signing aggregator
    problem: str | None  # None: it verifies


def check_receipt(receipt: SignedReceipt, aggregate: SignedAggregate | None, *, aggregator_key: bytes) -> str | None:
    """Why `receipt` does not verify against `aggregator_key` and its round's `aggregate`, or None if it does."""
    r = receipt.receipt
    try:
        receipt.verify(aggregator_key)
    except EnvelopeError as e:
        return f"signature: {e}"
    if not r.is_final:
        return "not a final receipt (no ledger row)"
    if not r.accepted:
        return None  # a rejection: signed, nothing was credited, nothing to prove
    if aggregate is None:
        return f"the aggregate of round {r.round} is missing beside the receipt"
    try:
        aggregate.verify([aggregator_key])
    except EnvelopeError as e:
        return f"aggregate signature: {e}"
    a = aggregate.header
    if (a.run_id, a.config_hash, a.round) != (r.run_id, r.config_hash, r.round):
        return f"the aggregate beside it is of run {a.run_id!r} round {a.round}, not this receipt's"
    try:
        proof = proof_from_bytes(r.merkle_proof)
    except ValueError as e:
        return f"Merkle proof: {e}"
    if not verify_proof(r.update_sha256, proof, a.updates_root):
        return f"the update is not under round {r.round}'s signed updates_root: the aggregate left it out"
    if dict(a.contributors).get(r.peer_public_key) != r.tokens_credited:
        return "the aggregate's contributor list does not credit the receipt's tokens"
    return None


def _read(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise EnvelopeError(f"{path.name} is over {max_bytes} bytes: not a receipt file")
    return data


def verify_receipts(root: Path, *, aggregator_keys: Collection[bytes] | None = None) -> list[ReceiptCheck]:
    """Check every receipt stored under `root` (see the module docstring), oldest round first.

    `aggregator_keys`: the keys to trust (the run config's); None trusts the key each receipt names,
    which still proves that what was signed is consistent, not who signed it.
    """
    checks = []
    for path in sorted(root.expanduser().glob("*/round-*.receipt")):
        if not _RECEIPT.fullmatch(path.name):
            continue
        try:
            receipt = SignedReceipt.from_bytes(_read(path, MAX_RECEIPT_ENVELOPE_BYTES))
        except (OSError, EnvelopeError) as e:
            checks.append(_unreadable(path, str(e)))
            continue
        r = receipt.receipt
        key = r.aggregator_public_key
        if aggregator_keys is not None and key not in aggregator_keys:
            problem: str | None = f"signed by aggregator {fingerprint(key)}, which is not a trusted key"
        else:
            aggregate = None
            aggregate_path = path.parent / f"aggregate-{r.round:08d}.bin"
            try:
                if aggregate_path.is_file():
                    aggregate = SignedAggregate.from_bytes(_read(aggregate_path, MAX_AGGREGATE_ENVELOPE_BYTES))
            except (OSError, EnvelopeError) as e:
                problem = f"aggregate file: {e}"
            else:
                problem = check_receipt(receipt, aggregate, aggregator_key=key)
        checks.append(
            ReceiptCheck(
                path=path,
                run_id=r.run_id,
                round=r.round,
                accepted=r.accepted,
                tokens_credited=r.tokens_credited,
                score=r.score,
                aggregator=fingerprint(key),
                problem=problem,
            )
        )
    return sorted(checks, key=lambda c: (c.run_id or "", c.round or 0, str(c.path)))


def _unreadable(path: Path, why: str) -> ReceiptCheck:
    return ReceiptCheck(
        path=path,
        run_id=None,
        round=None,
        accepted=False,
        tokens_credited=0,
        score=0.0,
        aggregator=None,
        problem=f"unreadable: {why}",
    )
