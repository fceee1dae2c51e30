"""What the incentives cost the aggregator per round: the durable ledger append and the final receipts.

Appends rounds of N rows (synchronous=FULL, one transaction and one signed head per round) to a
fresh ledger in a temporary directory, then builds and signs every row's final receipt (Merkle
proof included) and checks each the way a peer does. Prints a markdown table.

    python bench/ledger_cost.py --rounds 50 --peers 8 64 512
"""

import argparse
import hashlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from potluck.aggregator_server.accounting import final_receipt
from potluck.incentives.ledger import Ledger
from potluck.incentives.ledger_format import LedgerEntry
from potluck.incentives.merkle import merkle_root, proof_from_bytes, verify_proof
from potluck.protocol.identity import generate_identity


def _entries(round_index: int, peers: int) -> list[LedgerEntry]:
    return [
        LedgerEntry(
            peer_public_key=hashlib.sha256(b"peer %d" % i).digest(),
            tokens_claimed=30_720,
            weight=30_720.0,
            credit=30_720.0,
            accepted=True,
            payload_sha256=hashlib.sha256(b"payload %d %d" % (round_index, i)).digest(),
            update_digest=hashlib.sha256(b"update %d %d" % (round_index, i)).digest(),
            payload_bytes=8_000,
            time_s=time.time(),
        )
        for i in range(peers)
    ]


def measure(*, rounds: int, peers: int) -> dict[str, float]:
    """Median seconds per round: the append, and the receipts (build + sign + the peer's check) of all rows."""
    identity = generate_identity()
    appends, receipts = [], []
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp) / "ledger.sqlite") as ledger:
        for r in range(rounds):
            entries = _entries(r, peers)
            started = time.perf_counter()
            ledger.append_round(round_index=r, entries=entries, identity=identity)
            appends.append(time.perf_counter() - started)
            rows = ledger.rows(round_index=r)
            root = merkle_root([e.update_digest for e in entries])
            started = time.perf_counter()
            for e in entries:
                signed = final_receipt(rows, e.update_digest, run_id="bench", config_hash="0" * 64, identity=identity)
                assert signed is not None
                signed.verify(identity.public_key)
                assert verify_proof(e.update_digest, proof_from_bytes(signed.receipt.merkle_proof), root)
            receipts.append(time.perf_counter() - started)
    return {"append_s": statistics.median(appends), "receipts_s": statistics.median(receipts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--peers", type=int, nargs="+", default=[8, 64, 512])
    args = parser.parse_args()
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"`python bench/ledger_cost.py --rounds {args.rounds} --peers {' '.join(map(str, args.peers))}` on {machine}"
    )
    print()
    print(
        "| updates per round | ledger append (fsync'd) | per row | all receipts (build, sign, check) | per receipt |"
    )
    print("|---:|---:|---:|---:|---:|")
    for peers in args.peers:
        m = measure(rounds=args.rounds, peers=peers)
        print(
            f"| {peers} | {m['append_s'] * 1000:.2f} ms | {m['append_s'] / peers * 1e6:.0f} µs "
            f"| {m['receipts_s'] * 1000:.2f} ms | {m['receipts_s'] / peers * 1e6:.0f} µs |"
        )


if __name__ == "__main__":
    main()
