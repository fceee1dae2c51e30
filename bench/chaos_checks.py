"""The chaos soak's end checks: ledgers, receipts, and nothing acknowledged lost (see bench/chaos.py).

Each check reads only what a run leaves on disk (the aggregators' ledgers, the receipts the peers kept)
and what the peers printed (their acknowledgements), so it says what an operator or a volunteer could
check after the fact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potluck.incentives.ledger import Ledger
from potluck.incentives.merkle import merkle_root
from potluck.incentives.receipts import verify_receipts
from potluck.protocol.envelope import MAX_AGGREGATE_ENVELOPE_BYTES, SignedAggregate
from potluck.protocol.identity import fingerprint, public_key_to_hex

VERIFY_TIMEOUT_S = 120.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack:
    """An update a peer was told was accepted: on upload (`upload`) or by a verified final receipt (`final`)."""

    peer: str
    round: int
    update: str  # the digest's first 16 hex digits, as the peer prints it
    kind: str  # "upload" or "final"


def ledger_verify(state_dir: Path, key: bytes) -> dict[str, Any]:
    """`potluck ledger verify --state-dir DIR --key KEY --json`, as an operator runs it; its JSON and exit status."""
    command = [sys.executable, "-m", "potluck", "ledger", "verify", "--state-dir", str(state_dir), "--json"]
    done = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [*command, "--key", public_key_to_hex(key)], capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S
    )
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"ok": False, "message": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"state_dir": str(state_dir), "exit": done.returncode, **report}


def _rows_by_round(ledgers: Iterable[Path]) -> dict[tuple[bytes, int], list[tuple[bytes, bool]]]:
    """(aggregator key, round) -> (update digest, accepted) of each of that round's rows, from each ledger."""
    found: dict[tuple[bytes, int], list[tuple[bytes, bool]]] = {}
    for path in ledgers:
        with Ledger.open(path, read_only=True) as ledger:
            heads = ledger.heads()
            if not heads:
                continue
            key = heads[0].aggregator_public_key
            for row in ledger.rows():
                found.setdefault((key, row.round), []).append((row.entry.update_digest, bool(row.entry.accepted)))
    return found


def check_receipts(receipt_dirs: Iterable[Path], keys: Iterable[bytes]) -> dict[str, Any]:
    """Every receipt kept, verified offline against the run's aggregator keys (`potluck receipts verify`)."""
    trusted = set(keys)
    checked, bad = 0, []
    for directory in receipt_dirs:
        if not directory.is_dir():
            continue
        for check in verify_receipts(directory, aggregator_keys=trusted):
            checked += 1
            if check.problem is not None:
                bad.append(f"{check.path}: {check.problem}")
    return {"checked": checked, "bad": bad}


def check_merkle(receipt_dirs: Iterable[Path], ledgers: Iterable[Path]) -> dict[str, Any]:
    """Each signed aggregate a peer kept: its `updates_root` is the Merkle root of its round's accepted ledger rows."""
    accepted = {where: [d for d, ok in rows if ok] for where, rows in _rows_by_round(ledgers).items()}
    seen: set[tuple[bytes, int]] = set()
    mismatched = []
    for directory in receipt_dirs:
        for path in sorted(directory.glob("*/aggregate-*.bin")):
            data = path.read_bytes()
            if len(data) > MAX_AGGREGATE_ENVELOPE_BYTES:
                mismatched.append(f"{path}: too large to be an aggregate")
                continue
            header = SignedAggregate.from_bytes(data).header
            where = (header.aggregator_public_key, header.round)
            if where in seen:
                continue
            seen.add(where)
            rows = accepted.get(where)
            if rows is None or merkle_root(rows) != header.updates_root:
                who = fingerprint(header.aggregator_public_key)
                mismatched.append(
                    f"round {header.round} of {who}: the ledger's accepted rows are not its updates_root"
                )
    return {"aggregates_checked": len(seen), "mismatched": mismatched}


def check_acknowledged(acks: Iterable[Ack], ledgers: Iterable[Path]) -> dict[str, Any]:
    """Every acknowledged update is in a ledger: a final receipt's as an accepted row of its round, an upload's
    as a row (the round's close may still reject it) of its round or, taken late, a later one."""
    rounds_of: dict[str, list[tuple[int, bool]]] = {}
    for (_, r), rows in _rows_by_round(ledgers).items():
        for digest, ok in rows:
            rounds_of.setdefault(digest.hex()[:16], []).append((r, ok))
    counted: dict[str, int] = {"upload": 0, "final": 0}
    lost = []
    for ack in acks:
        counted[ack.kind] += 1
        rounds = rounds_of.get(ack.update, [])
        if ack.kind == "final":
            in_place = (ack.round, True) in rounds
        else:
            in_place = any(r >= ack.round for r, _ in rounds)
        if not in_place:
            lost.append(f"{ack.peer} round {ack.round} update {ack.update} ({ack.kind} ack)")
    return {"upload_acks": counted["upload"], "final_receipts": counted["final"], "lost": lost}
