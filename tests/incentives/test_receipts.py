"""A volunteer's receipts: kept beside the signed aggregates, verified offline, tampering and omissions caught."""

import dataclasses
import hashlib
from pathlib import Path

import pytest

from potluck.incentives.merkle import merkle_proof, merkle_root, proof_to_bytes
from potluck.incentives.receipts import ReceiptError, check_receipt, store_receipt, verify_receipts
from potluck.protocol.envelope import (
    AggregateHeader,
    Receipt,
    SignedAggregate,
    SignedReceipt,
    sign_aggregate,
    sign_receipt,
)
from potluck.protocol.identity import generate_identity

AGGREGATOR = generate_identity()
OTHER = generate_identity()
PEER = generate_identity()
CONFIG_HASH = hashlib.sha256(b"config").hexdigest()
DIGESTS = [hashlib.sha256(b"update %d" % i).digest() for i in range(5)]
MINE = DIGESTS[3]


def _aggregate(*, root: bytes | None = None, tokens: int = 700, signer=AGGREGATOR) -> SignedAggregate:  # noqa: ANN001
    header = AggregateHeader(
        run_id="receipts-test",
        config_hash=CONFIG_HASH,
        round=4,
        new_version=5,
        aggregator_public_key=signer.public_key,
        codec="none",
        payload_bytes=1,
        payload_sha256=bytes(32),
        state_sha256=bytes(32),
        contributors=((PEER.public_key, tokens), (bytes(32), 5)),
        timestamp_s=1.0,
        updates_root=merkle_root(DIGESTS) if root is None else root,
        ledger_head=hashlib.sha256(b"head").digest(),
    )
    return sign_aggregate(header, signer)


def _receipt(**changes: object) -> SignedReceipt:
    values: dict = dict(
        run_id="receipts-test",
        config_hash=CONFIG_HASH,
        round=4,
        peer_public_key=PEER.public_key,
        aggregator_public_key=AGGREGATOR.public_key,
        update_sha256=MINE,
        tokens_credited=700,
        accepted=True,
        timestamp_s=2.0,
        score=812.5,
        ledger_row_hash=hashlib.sha256(b"row").digest(),
        merkle_proof=proof_to_bytes(merkle_proof(DIGESTS, MINE)),
    )
    return sign_receipt(Receipt(**(values | changes)), AGGREGATOR)


def test_a_stored_receipt_verifies_offline(tmp_path: Path) -> None:
    # Prepare
    path = store_receipt(tmp_path, _receipt(), _aggregate())
    # Execute
    checks = verify_receipts(tmp_path, aggregator_keys={AGGREGATOR.public_key})
    # Assert
    assert [c.path for c in checks] == [path]
    assert checks[0].problem is None
    assert (checks[0].round, checks[0].tokens_credited, checks[0].score) == (4, 700, 812.5)


@pytest.mark.parametrize(
    ("aggregate", "receipt", "problem"),
    [
        (_aggregate(root=merkle_root(DIGESTS[:3])), _receipt(), "not under round 4's signed updates_root"),
        (_aggregate(tokens=900), _receipt(), "does not credit the receipt's tokens"),
        (_aggregate(signer=OTHER), _receipt(), "aggregate signature"),
        (None, _receipt(), "is missing"),
        (_aggregate(), _receipt(merkle_proof=b"\x01" + bytes(5)), "Merkle proof"),
        (_aggregate(), _receipt(ledger_row_hash=b""), "not a final receipt"),
    ],
)
def test_a_receipt_the_aggregate_does_not_back_fails(
    aggregate: SignedAggregate | None, receipt: SignedReceipt, problem: str
) -> None:
    found = check_receipt(receipt, aggregate, aggregator_key=AGGREGATOR.public_key)

    assert found is not None and problem in found


def test_an_edited_receipt_fails_its_signature() -> None:
    signed = _receipt()
    edited = SignedReceipt(receipt=dataclasses.replace(signed.receipt, score=1e9), signature=signed.signature)

    found = check_receipt(edited, _aggregate(), aggregator_key=AGGREGATOR.public_key)

    assert found is not None and found.startswith("signature")


def test_a_rejection_receipt_verifies_without_an_aggregate() -> None:
    rejected = _receipt(accepted=False, tokens_credited=0, score=0.0, merkle_proof=b"", reason="norm: too big")

    assert check_receipt(rejected, None, aggregator_key=AGGREGATOR.public_key) is None


def test_untrusted_keys_and_unreadable_files_are_reported_not_raised(tmp_path: Path) -> None:
    # Prepare: one good receipt, one garbage file with a receipt's name
    good = store_receipt(tmp_path, _receipt(), _aggregate())
    garbage = good.parent / "round-00000009-0123456789abcdef.receipt"
    garbage.write_bytes(b"\x00garbage")
    # Execute
    checks = verify_receipts(tmp_path, aggregator_keys={OTHER.public_key})
    # Assert
    problems = {c.path.name: c.problem for c in checks}
    assert "not a trusted key" in problems[good.name]
    assert problems[garbage.name].startswith("unreadable")


def test_only_final_receipts_are_kept(tmp_path: Path) -> None:
    with pytest.raises(ReceiptError, match="only final receipts"):
        store_receipt(tmp_path, _receipt(ledger_row_hash=b"", merkle_proof=b""), _aggregate())
    assert not any(tmp_path.iterdir())
