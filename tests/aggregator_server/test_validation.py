"""Tests for potluck.aggregator_server.validation: each check refuses what it should, with its own name."""

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.aggregator_server.validation import (
    ENVELOPE_CHECKS,
    Rejection,
    RoundContext,
    check_envelope,
    decode_update,
)
from potluck.protocol.codecs import make_codec
from potluck.protocol.envelope import SignedUpdate, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity, generate_identity

PEER = generate_identity()
OTHER = generate_identity()
CONFIG_HASH = hashlib.sha256(b"validation run").hexdigest()
RUN_ID = "validation-test"
ROUND = 5
SPEC = {"h.0.w": (8, 16), "h.0.b": (16,)}
CODEC = make_codec("dct-topk")
NONE_CODEC = make_codec("none")


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SPEC.items()}


PAYLOAD = CODEC.encode(_tensors())


def _context(**changes: Any) -> RoundContext:
    values: dict[str, Any] = dict(
        run_id=RUN_ID,
        config_hash=CONFIG_HASH,
        round=ROUND,
        version=ROUND,
        codec="dct-topk",
        max_update_bytes=CODEC.max_payload_bytes(SPEC),
        accepted_digests={},
    )
    return RoundContext(**(values | changes))


def _signed(payload: bytes = PAYLOAD, *, identity: Identity = PEER, **changes: Any) -> SignedUpdate:
    values: dict[str, Any] = dict(
        run_id=RUN_ID,
        config_hash=CONFIG_HASH,
        round=ROUND,
        base_version=ROUND,
        peer_public_key=identity.public_key,
        tokens=4_096,
        inner_steps=30,
        codec="dct-topk",
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=1_700_000_000.0,
    )
    return sign_update(UpdateHeader(**(values | changes)), identity)


def _with_bad_signature(update: SignedUpdate) -> SignedUpdate:
    signature = bytes([update.signature[0] ^ 1]) + update.signature[1:]
    return SignedUpdate(header=update.header, signature=signature)


def test_a_good_update_passes_every_check_and_decodes() -> None:
    # Prepare
    update, ctx = _signed(), _context()
    # Execute
    results = [check(update, PAYLOAD, ctx) for check in ENVELOPE_CHECKS]
    decoded, rejection = decode_update(PAYLOAD, codec=CODEC, spec=SPEC)
    # Assert
    assert results == [None] * len(ENVELOPE_CHECKS)
    assert check_envelope(update, PAYLOAD, ctx) is None
    assert rejection is None
    assert decoded is not None
    expected = CODEC.decode(PAYLOAD, SPEC)
    assert decoded.keys() == expected.keys()
    assert all(decoded[name].equal(expected[name]) for name in SPEC)


@pytest.mark.parametrize(
    ("build", "ctx_changes", "check", "detail"),
    [
        (lambda: (_with_bad_signature(_signed()), PAYLOAD), {}, "signature", "signature"),
        (lambda: (_signed(), PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1])), {}, "signature", "sha256 does not match"),
        (lambda: (_signed(), PAYLOAD + b"\0"), {}, "signature", "the signed header says"),
        (lambda: (_signed(run_id="another-run"), PAYLOAD), {}, "run", "'another-run'"),
        (lambda: (_signed(config_hash="0" * 64), PAYLOAD), {}, "run", "config 000000000000"),
        (lambda: (_signed(round=ROUND + 1, base_version=ROUND + 1), PAYLOAD), {}, "round", "round 6, the open round"),
        (lambda: (_signed(round=ROUND - 1, base_version=ROUND - 1), PAYLOAD), {}, "round", "round 4, the open round"),
        (lambda: (_signed(base_version=ROUND - 1), PAYLOAD), {}, "stale", "state v4, current is v5"),
        (lambda: (_signed(), PAYLOAD), {"max_update_bytes": len(PAYLOAD) - 1}, "size", f"{len(PAYLOAD)} bytes"),
        (lambda: (_signed(codec="topk"), PAYLOAD), {}, "codec", "codec 'topk', the run uses 'dct-topk'"),
        (lambda: (_signed(tokens=0), PAYLOAD), {}, "empty", "no tokens"),
        (lambda: (_signed(inner_steps=0), PAYLOAD), {}, "empty", "no inner steps"),
        (
            lambda: (_signed(), PAYLOAD),
            {"now_s": 1_700_001_000.0, "timestamp_window_s": 900.0},
            "freshness",
            "1000 s behind the aggregator's clock",
        ),
        (
            lambda: (_signed(timestamp_s=1_700_000_950.0), PAYLOAD),
            {"now_s": 1_700_000_000.0, "timestamp_window_s": 900.0},
            "freshness",
            "950 s ahead of",
        ),
        (
            lambda: (_signed(nonce=bytes(16)), PAYLOAD),
            {"seen_nonces": {bytes(16): b"another update's digest"}},
            "replay",
            "nonce already used",
        ),
        pytest.param(
            lambda: (_signed(), PAYLOAD),
            {"round_payloads": {payload_digest(PAYLOAD): OTHER.public_key}},
            "replay",
            f"already sent this round by {OTHER.fingerprint}",
            id="replay-sent-by-another",  # the fingerprint is random: not in the id, which pytest -n compares
        ),
    ],
)
def test_each_envelope_check_refuses_with_its_name(
    build: Any, ctx_changes: dict[str, Any], check: str, detail: str
) -> None:
    # Prepare
    update, payload = build()
    # Execute
    rejection = check_envelope(update, payload, _context(**ctx_changes))
    # Assert
    assert isinstance(rejection, Rejection)
    assert rejection.check == check
    assert detail in rejection.detail
    assert "\n" not in str(rejection)
    assert str(rejection).startswith(f"{check}: ")


def test_a_second_different_update_from_the_same_key_is_a_duplicate() -> None:
    # Prepare: the key already has an accepted update this round
    first, second = _signed(), _signed(tokens=8_192)
    ctx = _context(accepted_digests={PEER.public_key: first.header.digest()})
    # Execute
    rejection = check_envelope(second, PAYLOAD, ctx)
    # Assert
    assert rejection is not None
    assert rejection.check == "duplicate"
    assert PEER.fingerprint in rejection.detail


def test_a_keys_own_update_behind_its_late_one_is_refused_as_round_not_as_a_duplicate() -> None:
    # Prepare: the key's place this round is held by its late update for the round before
    late, own = _signed(round=ROUND - 1), _signed()
    ctx = _context(accepted_digests={PEER.public_key: late.header.digest()}, late_slots={PEER.public_key: ROUND - 1})
    # Execute
    rejection = check_envelope(own, PAYLOAD, ctx)
    # Assert: "round" is not a strike, "duplicate" would be
    assert rejection is not None and rejection.check == "round"
    assert f"late update for round {ROUND - 1} counts in round {ROUND}" in rejection.detail


def test_the_identical_update_sent_again_is_a_retry_not_a_duplicate() -> None:
    update = _signed()
    ctx = _context(accepted_digests={PEER.public_key: update.header.digest()})

    retry = SignedUpdate.from_bytes(update.to_bytes())

    assert check_envelope(retry, PAYLOAD, ctx) is None


def test_another_keys_accepted_update_does_not_make_a_duplicate() -> None:
    ctx = _context(accepted_digests={OTHER.public_key: _signed(identity=OTHER).header.digest()})

    assert check_envelope(_signed(), PAYLOAD, ctx) is None


def test_the_signature_is_checked_before_the_round() -> None:
    # Prepare: wrong on every count, and badly signed
    update = _with_bad_signature(_signed(round=ROUND + 3, base_version=0, run_id="other", tokens=0, codec="none"))
    # Execute
    rejection = check_envelope(update, PAYLOAD, _context(max_update_bytes=1))
    # Assert
    assert rejection is not None and rejection.check == "signature"


def test_the_run_is_checked_before_the_round_and_the_round_before_the_size() -> None:
    wrong_run = _signed(run_id="other", round=ROUND + 1, tokens=0)
    wrong_round = _signed(round=ROUND + 1, tokens=0)

    assert check_envelope(wrong_run, PAYLOAD, _context()).check == "run"  # type: ignore[union-attr]
    assert check_envelope(wrong_round, PAYLOAD, _context(max_update_bytes=1)).check == "round"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not a codec payload",
        make_codec("topk").encode(_tensors()),  # another codec's payload
        CODEC.encode({"h.0.w": torch.ones(8, 16)}),  # another model's names
        CODEC.encode({"h.0.w": torch.ones(16, 8), "h.0.b": torch.ones(16)}),  # another model's shapes
        PAYLOAD[: len(PAYLOAD) // 2],
    ],
)
def test_an_undecodable_payload_is_refused_as_decode(payload: bytes) -> None:
    # Prepare: a correctly signed update carrying it passes the envelope checks
    assert check_envelope(_signed(payload), payload, _context()) is None
    # Execute
    decoded, rejection = decode_update(payload, codec=CODEC, spec=SPEC)
    # Assert
    assert decoded is None
    assert rejection is not None and rejection.check == "decode"
    assert "\n" not in rejection.detail


def _none_payload_with_nan() -> bytes:
    tensors = {name: torch.full(shape, 1.25) for name, shape in SPEC.items()}
    payload = NONE_CODEC.encode(tensors)
    one_and_a_quarter = struct.pack("<f", 1.25)
    assert one_and_a_quarter in payload
    return payload.replace(one_and_a_quarter, struct.pack("<f", math.nan), 1)


def test_a_nan_in_a_none_payload_is_refused() -> None:
    # Prepare: a "none" payload whose first value is NaN, signed by its peer
    payload = _none_payload_with_nan()
    update = _signed(payload, codec="none")
    assert check_envelope(update, payload, _context(codec="none", max_update_bytes=10_000)) is None
    # Execute
    decoded, rejection = decode_update(payload, codec=NONE_CODEC, spec=SPEC)
    # Assert: the none codec already refuses non-finite values while decoding
    assert decoded is None
    assert rejection is not None and rejection.check == "decode"
    assert "NaN" in rejection.detail


class _DecodesTo:
    """A codec stand-in whose decode returns fixed tensors: reaches the finiteness check behind any codec."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def decode(self, payload: bytes, spec: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        return self.tensors


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_decoded_values_are_refused_as_finite(bad: float) -> None:
    tensors = _tensors()
    tensors["h.0.b"][3] = bad

    decoded, rejection = decode_update(b"", codec=_DecodesTo(tensors), spec=SPEC)  # type: ignore[arg-type]

    assert decoded is None
    assert rejection is not None and rejection.check == "finite"
    assert "'h.0.b'" in rejection.detail


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_payload_bytes_are_refused_or_decode_finite(data: bytes) -> None:
    decoded, rejection = decode_update(data, codec=CODEC, spec=SPEC)

    if rejection is not None:
        assert decoded is None and rejection.check in {"decode", "finite"}
    else:
        assert decoded is not None
        assert all(torch.isfinite(t).all() for t in decoded.values())


def test_the_same_update_resent_is_not_a_replay_of_itself() -> None:
    update = _signed()
    ctx = _context(
        seen_nonces={update.header.nonce: update.header.digest()},
        round_payloads={payload_digest(PAYLOAD): PEER.public_key},
        accepted_digests={PEER.public_key: update.header.digest()},
        now_s=update.header.timestamp_s + 10,
        timestamp_window_s=900.0,
    )

    assert check_envelope(update, PAYLOAD, ctx) is None
