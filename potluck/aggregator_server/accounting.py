"""What a round writes to the ledger, and the final receipts read back from it.

At round close the aggregator turns its decision into one `LedgerEntry` per received update: the
updates refused on arrival (whose signature verified: an unsigned upload is nobody's), the ones the
round's checks dropped, and the kept ones with their weight and credit (incentives/scoring.py).
After the rows are durable, a peer's final receipt is built from them: its row hash, its score, and
the Merkle proof that its update is under the aggregate's `updates_root`. At start the state dir's
ledger is checked to be this aggregator's and no further than its checkpoint.
"""

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from potluck.aggregator_server.judge import Verdict
from potluck.aggregator_server.rounds import Accepted
from potluck.aggregator_server.setup import SetupError
from potluck.aggregator_server.validation import Rejection
from potluck.events import LedgerHead
from potluck.incentives.ledger import Ledger, LedgerError
from potluck.incentives.ledger_format import LedgerEntry, LedgerRow, SignedHead
from potluck.incentives.merkle import MerkleTree, proof_to_bytes
from potluck.incentives.scoring import ScoringRule, credit
from potluck.protocol.envelope import MAX_REASON_CHARS, Receipt, SignedReceipt, SignedUpdate, sign_receipt
from potluck.protocol.identity import Identity, fingerprint

HISTORY_ROUNDS = 16  # a peer's own past claims the scoring rule looks at
RUN_RULE = ScoringRule()  # the scoring rule's knobs (documented defaults; not part of the run config yet)


def _printable(text: str, max_chars: int = MAX_REASON_CHARS) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:max_chars]


def refused_entry(update: SignedUpdate, *, payload_bytes: int, rejection: Rejection, received_s: float) -> LedgerEntry:
    """The row of an update refused on arrival (its signature verified): no weight, no credit."""
    h = update.header
    return LedgerEntry(
        peer_public_key=h.peer_public_key,
        tokens_claimed=h.tokens,
        weight=0.0,
        credit=0.0,
        accepted=False,
        check=_printable(rejection.check, 64) or "refused",
        detail=_printable(rejection.detail),
        payload_sha256=h.payload_sha256,
        update_digest=h.digest(),
        payload_bytes=payload_bytes,
        time_s=received_s,
    )


def round_entries(
    accepted: Sequence[Accepted],
    verdict: Verdict,
    *,
    token_cap: int,
    history: Callable[[bytes], Sequence[float]],
    rule: ScoringRule = RUN_RULE,
) -> list[LedgerEntry]:
    """One row per update the round judged (`accepted` in the order `verdict` indexes), credits included.

    `history(key)` is the peer's recent accepted weights (its claim history for the scoring rule).
    """
    kept = dict(zip(verdict.kept, verdict.weights, strict=True))
    claims = [accepted[i].claim for i in verdict.kept]
    kept_gains = [verdict.gains[i] for i in verdict.kept if i in verdict.gains]
    median_gain = statistics.median(kept_gains) if kept_gains else None
    entries = []
    for i, a in enumerate(accepted):
        h = a.update.header
        rejection = verdict.rejections.get(i)
        if rejection is not None:
            entries.append(
                refused_entry(a.update, payload_bytes=len(a.payload), rejection=rejection, received_s=a.received_s)
            )
            continue
        points = credit(
            a.claim,  # a late update's claim counts at the run's discount
            accepted=True,
            round_claims=claims,
            history=[int(w) for w in history(h.peer_public_key)],
            token_cap=token_cap,
            gain=verdict.gains.get(i),
            median_gain=median_gain,
            rule=rule,
        )
        entries.append(
            LedgerEntry(
                peer_public_key=h.peer_public_key,
                tokens_claimed=h.tokens,
                weight=float(int(kept[i])),  # the tokens the aggregate's contributor list credits
                credit=points,
                accepted=True,
                payload_sha256=h.payload_sha256,
                update_digest=h.digest(),
                payload_bytes=len(a.payload),
                time_s=a.received_s,
            )
        )
    return entries


class RoundReceipts:
    """One closed round's ledger rows, indexed to sign its final receipts: each in O(log n), not O(n).

    An accepted update's receipt carries the Merkle proof of its digest among the round's accepted
    digests: the leaves of the aggregate's `updates_root`. The tree is built once per round.
    """

    def __init__(self, rows: Sequence[LedgerRow]) -> None:
        self._rows: dict[bytes, LedgerRow] = {}
        for row in rows:
            self._rows.setdefault(row.entry.update_digest, row)  # the first row of a digest, as a scan finds it
        accepted = [r.entry.update_digest for r in rows if r.entry.accepted]
        self._tree = MerkleTree(accepted) if accepted else None

    def receipt(
        self, update_digest: bytes, *, run_id: str, config_hash: str, identity: Identity
    ) -> SignedReceipt | None:
        """The signed final receipt of the update named `update_digest`, or None if the round has no such row."""
        row = self._rows.get(update_digest)
        if row is None:
            return None
        e = row.entry
        proof = b""
        if e.accepted:
            assert self._tree is not None  # an accepted row is a leaf
            proof = proof_to_bytes(self._tree.proof(update_digest))
        receipt = Receipt(
            run_id=run_id,
            config_hash=config_hash,
            round=row.round,
            peer_public_key=e.peer_public_key,
            aggregator_public_key=identity.public_key,
            update_sha256=update_digest,
            tokens_credited=int(e.weight) if e.accepted else 0,
            accepted=e.accepted,
            reason="" if e.accepted else f"{e.check}: {e.detail}"[:MAX_REASON_CHARS],
            timestamp_s=time.time(),
            score=float(e.credit),
            ledger_row_hash=row.row_hash,
            merkle_proof=proof,
        )
        return sign_receipt(receipt, identity)


def final_receipt(
    rows: Sequence[LedgerRow],
    update_digest: bytes,
    *,
    run_id: str,
    config_hash: str,
    identity: Identity,
) -> SignedReceipt | None:
    """The signed final receipt of the update named `update_digest` among one round's ledger `rows`, or None."""
    return RoundReceipts(rows).receipt(update_digest, run_id=run_id, config_hash=config_hash, identity=identity)


def open_ledger(path: Path, *, identity: Identity, round_index: int) -> Ledger:
    """The state dir's ledger, checked to belong to this aggregator and to be at most the open round."""
    try:
        ledger = Ledger.open(path)
        head = ledger.head()
    except LedgerError as e:
        raise SetupError(str(e)) from e
    if head is not None and head.aggregator_public_key != identity.public_key:
        ledger.close()
        raise SetupError(
            f"{path} is signed by aggregator {fingerprint(head.aggregator_public_key)}, not this one "
            f"({identity.fingerprint}); use that aggregator's --identity or another --state-dir"
        )
    if head is not None and head.round > round_index:
        ledger.close()
        raise SetupError(
            f"{path} records round {head.round} but the checkpoint is at round {round_index}; "
            "the state dir's checkpoint is missing or older than its ledger: use another --state-dir"
        )
    return ledger


def head_event(head: SignedHead | None) -> LedgerHead | None:
    """A signed ledger head as JSON-able values (hex for bytes), for events and the status page."""
    if head is None:
        return None
    return LedgerHead(
        round=head.round,
        last_row_id=head.last_row_id,
        head_hash=head.head_hash.hex(),
        row_count=head.row_count,
        timestamp_s=head.timestamp_s,
        aggregator_public_key=head.aggregator_public_key.hex(),
        signature=head.signature.hex(),
    )
