"""Shared by the ledger tests: an aggregator identity, made-up entries, and a ledger with a few rounds in it."""

import hashlib
from pathlib import Path
from typing import Any

from potluck.incentives.ledger import Ledger
from potluck.incentives.ledger_format import LedgerEntry
from potluck.protocol.identity import generate_identity

AGGREGATOR = generate_identity()
# The rounds `fill_ledger` writes: round -> accepted flags of its rows (round 2 received nothing).
ROUNDS = {0: [True, False, True], 1: [True, True, False, True], 2: [], 3: [True, True]}


def entry(i: int, *, accepted: bool = True, **changes: Any) -> LedgerEntry:
    """Update number `i` of a made-up run: from peer i % 3 + 1, accepted or rejected by the norm check."""
    values: dict[str, Any] = dict(
        peer_public_key=bytes([i % 3 + 1]) * 32,
        tokens_claimed=4096 + i,
        weight=1.0 if accepted else 0.0,
        credit=4096.0 + i if accepted else 0.0,
        accepted=accepted,
        check="" if accepted else "norm",
        detail="" if accepted else f"update norm {i}.5 is over the cap",
        payload_sha256=hashlib.sha256(f"payload {i}".encode()).digest(),
        update_digest=hashlib.sha256(f"update {i}".encode()).digest(),
        payload_bytes=100_000 + i,
        time_s=1_700_000_000.0 + i / 8,
    )
    return LedgerEntry(**(values | changes))


def fill_ledger(directory: Path) -> Path:
    """A closed ledger of ROUNDS in `directory`: rows 1-3 are round 0, 4-7 round 1, none round 2, 8-9 round 3."""
    path = directory / "ledger.sqlite"
    with Ledger.open(path) as ledger:
        i = 0
        for round_index, flags in ROUNDS.items():
            entries = []
            for accepted in flags:
                i += 1
                entries.append(entry(i, accepted=accepted))
            ledger.append_round(round_index=round_index, entries=entries, identity=AGGREGATOR)
    return path
