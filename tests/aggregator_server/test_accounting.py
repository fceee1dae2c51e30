"""Tests for potluck.aggregator_server.accounting: a round's ledger rows and the final receipts built from them."""

import hashlib
from pathlib import Path

from potluck.aggregator_server.accounting import final_receipt, refused_entry, round_entries
from potluck.aggregator_server.judge import Verdict
from potluck.aggregator_server.rounds import Accepted
from potluck.aggregator_server.validation import Rejection
from potluck.incentives.ledger import Ledger
from potluck.incentives.merkle import merkle_root, proof_from_bytes, verify_proof
from potluck.incentives.scoring import credit
from potluck.protocol.envelope import UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity, generate_identity

AGGREGATOR = generate_identity()
PEERS = [generate_identity() for _ in range(3)]
CONFIG_HASH = hashlib.sha256(b"config").hexdigest()
TOKEN_CAP = 10_000


def _accepted(peer: Identity, *, tokens: int, received_s: float, payload: bytes = b"payload") -> Accepted:
    header = UpdateHeader(
        run_id="accounting-test",
        config_hash=CONFIG_HASH,
        round=2,
        base_version=2,
        peer_public_key=peer.public_key,
        tokens=tokens,
        inner_steps=10,
        codec="none",
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=1_700_000_000.0,
    )
    update = sign_update(header, peer)
    return Accepted(
        update=update,
        envelope=update.to_bytes(),
        payload=payload,
        decoded={},
        weight=float(tokens),
        received_s=received_s,
    )


ROUND = [_accepted(peer, tokens=1_000 * (i + 1), received_s=100.0 + i) for i, peer in enumerate(PEERS)]
# Updates 0 and 2 kept (2's weight capped), 1 dropped by the norm check; 0 helped twice as much as 2.
VERDICT = Verdict(
    kept=(0, 2),
    weights=(1_000.0, 2_500.5),
    rejections={1: Rejection(check="norm", detail="norm 40 is 9 deviations out")},
    gains={0: 0.2, 2: 0.1},
)


def test_round_entries_record_every_judged_update_with_its_weight_and_credit() -> None:
    # Execute
    entries = round_entries(ROUND, VERDICT, token_cap=TOKEN_CAP, history=lambda key: [])
    # Assert
    assert [e.peer_public_key for e in entries] == [p.public_key for p in PEERS]
    assert [e.update_digest for e in entries] == [a.update.header.digest() for a in ROUND]
    assert [e.accepted for e in entries] == [True, False, True]
    dropped = entries[1]
    assert (dropped.check, dropped.detail, dropped.weight, dropped.credit) == (
        "norm",
        VERDICT.rejections[1].detail,
        0,
        0,
    )
    assert entries[2].weight == 2_500.0  # whole tokens, as the aggregate's contributor list credits them
    for i, gain in ((0, 0.2), (2, 0.1)):
        expected = credit(
            ROUND[i].update.header.tokens,
            accepted=True,
            round_claims=[1_000, 3_000],
            history=[],
            token_cap=TOKEN_CAP,
            gain=gain,
            median_gain=0.15000000000000002,
        )
        assert entries[i].credit == expected
    assert entries[0].credit > entries[0].tokens_claimed  # helped more than the median: quality weight above 1


def test_a_peers_history_caps_its_credit() -> None:
    # Prepare: peer 2 claimed about 500 tokens for its last rounds, now claims 3000
    history = {PEERS[2].public_key: [500.0, 500.0, 500.0, 500.0]}
    no_gains = Verdict(kept=VERDICT.kept, weights=VERDICT.weights, rejections=VERDICT.rejections)
    # Execute
    entries = round_entries(ROUND, no_gains, token_cap=TOKEN_CAP, history=lambda key: history.get(key, []))
    # Assert
    assert entries[2].credit == 1_000  # 2 x its own median past claim
    assert entries[0].credit == 1_000


def test_a_refused_upload_earns_nothing_and_keeps_its_reason() -> None:
    a = ROUND[0]

    entry = refused_entry(
        a.update, payload_bytes=7, rejection=Rejection(check="round", detail="late\nby 2"), received_s=5.0
    )

    assert not entry.accepted and entry.credit == 0 and entry.weight == 0
    assert (entry.check, entry.detail, entry.payload_bytes, entry.time_s) == ("round", "late?by 2", 7, 5.0)


def test_final_receipts_prove_inclusion_and_name_the_ledger_row(tmp_path: Path) -> None:
    # Prepare: the round's rows in a real ledger
    entries = round_entries(ROUND, VERDICT, token_cap=TOKEN_CAP, history=lambda key: [])
    with Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        ledger.append_round(round_index=2, entries=entries, identity=AGGREGATOR)
        rows = ledger.rows(round_index=2)
    root = merkle_root([ROUND[0].update.header.digest(), ROUND[2].update.header.digest()])
    # Execute
    receipts = [
        final_receipt(
            rows, a.update.header.digest(), run_id="accounting-test", config_hash=CONFIG_HASH, identity=AGGREGATOR
        )
        for a in ROUND
    ]
    # Assert
    for a, signed, row in zip(ROUND, receipts, rows, strict=True):
        assert signed is not None
        signed.verify(AGGREGATOR.public_key)
        r = signed.receipt
        assert (r.round, r.peer_public_key, r.update_sha256) == (
            2,
            a.update.header.peer_public_key,
            a.update.header.digest(),
        )
        assert r.is_final and r.ledger_row_hash == row.row_hash and r.score == row.entry.credit
    kept = receipts[2].receipt
    assert kept.accepted and kept.tokens_credited == 2_500
    assert verify_proof(kept.update_sha256, proof_from_bytes(kept.merkle_proof), root)
    dropped = receipts[1].receipt
    assert not dropped.accepted and dropped.merkle_proof == b"" and dropped.reason.startswith("norm: ")
    assert final_receipt(rows, bytes(32), run_id="x", config_hash=CONFIG_HASH, identity=AGGREGATOR) is None
