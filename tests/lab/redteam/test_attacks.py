"""Tests for potluck.lab.redteam.attacks: every strategy's uploads are refused or neutralised by the real checks.

Each test builds an AttackContext by hand (a small model spec, the run's dct-topk codec, an honest delta
of a shared direction plus a little noise), runs one attack, and puts what it would upload through the
aggregator's own checks: the envelope checks and decode_update of ``validation``, and the round-close
norm and direction checks of ``round_checks`` among seven honest updates of the same round.
"""

import hashlib
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from potluck.aggregator_server.round_checks import direction_check, norm_check, round_checks, update_norms
from potluck.aggregator_server.validation import (
    Rejection,
    RoundContext,
    check_envelope,
    check_replay,
    check_round,
    check_signature,
    decode_update,
)
from potluck.lab.redteam.attacks import ATTACKS, AttackContext
from potluck.protocol.codecs import make_codec
from potluck.protocol.envelope import SignedUpdate, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity, generate_identity

Tensors = dict[str, torch.Tensor]

ME = generate_identity()
OTHER = generate_identity()
THIRD = generate_identity()
CONFIG_HASH = hashlib.sha256(b"red team run").hexdigest()
RUN_ID = "redteam-test"
ROUND = 3
SPEC = {"a": (32, 16), "b": (64,)}
CODEC = make_codec("dct-topk")
FIXED_NONCE = bytes(range(16))  # the noise and bitflip attacks seed their randomness from the nonce


def _direction() -> Tensors:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in SPEC.items()}


def _honest_delta(seed: int) -> Tensors:
    """The round's shared direction plus 10% noise of its own: what an honest peer trains."""
    generator = torch.Generator().manual_seed(1_000 + seed)
    return {name: v + 0.1 * torch.randn(v.shape, generator=generator) for name, v in _direction().items()}


def _fresh_delta() -> Tensors:
    """A delta from a freshly initialised model: large and unrelated to the round's direction."""
    generator = torch.Generator().manual_seed(99)
    return {name: 50 * torch.randn(shape, generator=generator) for name, shape in SPEC.items()}


def _decode(payload: bytes) -> Tensors:
    return CODEC.decode(payload, SPEC)


HONEST_PAYLOAD = CODEC.encode(_honest_delta(0))
HONEST = _decode(HONEST_PAYLOAD)
OTHERS_HONEST = [_decode(CODEC.encode(_honest_delta(seed))) for seed in range(1, 8)]  # seven honest peers


def _norm(delta: Tensors) -> float:
    return update_norms([delta])[0]


def _header(payload: bytes, *, identity: Identity = ME, round: int = ROUND, **changes: Any) -> UpdateHeader:
    values: dict[str, Any] = dict(
        run_id=RUN_ID,
        config_hash=CONFIG_HASH,
        round=round,
        base_version=round,
        peer_public_key=identity.public_key,
        tokens=4_096,
        inner_steps=30,
        codec="dct-topk",
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=time.time(),
    )
    return UpdateHeader(**(values | changes))


def _signed(payload: bytes, *, identity: Identity = ME, round: int = ROUND, **changes: Any) -> SignedUpdate:
    return sign_update(_header(payload, identity=identity, round=round, **changes), identity)


def _attack_context(tmp_path: Path, *, round: int = ROUND, spool: Path | None = None, **changes: Any) -> AttackContext:
    values: dict[str, Any] = dict(
        identity=ME,
        header=_header(HONEST_PAYLOAD, round=round, nonce=FIXED_NONCE),
        payload=HONEST_PAYLOAD,
        decode=_decode,
        encode=CODEC.encode,
        fresh_delta=_fresh_delta,
        shared=tmp_path / "shared",
        spool=spool,
        memory={"colluders": 1},
    )
    return AttackContext(**(values | changes))


def _round_context(round: int = ROUND, **changes: Any) -> RoundContext:
    values: dict[str, Any] = dict(
        run_id=RUN_ID,
        config_hash=CONFIG_HASH,
        round=round,
        version=round,
        codec="dct-topk",
        max_update_bytes=CODEC.max_payload_bytes(SPEC),
        accepted_digests={},
        now_s=time.time(),
        timestamp_window_s=600.0,
    )
    return RoundContext(**(values | changes))


def _spool_update(spool: Path, update: SignedUpdate, payload: bytes) -> None:
    """Lay an update out as the aggregator spools it: 8-byte big-endian envelope length + envelope + payload."""
    round_dir = spool / "spool" / f"round-{update.header.round}"
    round_dir.mkdir(parents=True, exist_ok=True)
    envelope = update.to_bytes()
    (round_dir / f"{update.header.peer_public_key.hex()}.update").write_bytes(
        struct.pack(">Q", len(envelope)) + envelope + payload
    )


def _spool_with_other(tmp_path: Path) -> tuple[Path, SignedUpdate, bytes]:
    """A spool holding another peer's honest round-3 update (and a third peer's round-4 one)."""
    spool = tmp_path / "state"
    payload = CODEC.encode(_honest_delta(1))
    update = _signed(payload, identity=OTHER)
    _spool_update(spool, update, payload)
    later = CODEC.encode(_honest_delta(2))
    _spool_update(spool, _signed(later, identity=THIRD, round=ROUND + 1), later)
    return spool, update, payload


def _run(name: str, ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    uploads = ATTACKS[name](ctx)
    assert uploads, f"{name} uploaded nothing"
    assert all(isinstance(u, SignedUpdate) and isinstance(p, bytes) for u, p in uploads)
    return uploads


def _single(name: str, ctx: AttackContext) -> tuple[SignedUpdate, bytes]:
    uploads = _run(name, ctx)
    assert len(uploads) == 1
    return uploads[0]


def _decoded(payload: bytes) -> Tensors:
    decoded, rejection = decode_update(payload, codec=CODEC, spec=SPEC)
    assert rejection is None, rejection
    assert decoded is not None
    return decoded


def _decoded_any_order(payload: bytes) -> tuple[Tensors, list[str]]:
    """Decode a colluding attack's payload and say its tensor order (the model's, as the order test checks)."""
    for order in (list(SPEC), list(reversed(SPEC))):
        decoded, _ = decode_update(payload, codec=CODEC, spec={k: SPEC[k] for k in order})
        if decoded is not None:
            return {k: decoded[k] for k in SPEC}, order
    raise AssertionError("the payload decodes in neither tensor order")


def _through_codec(delta: Tensors, order: list[str]) -> Tensors:
    """What the aggregator decodes of `delta` encoded with its tensors in `order` (the codec chunks across them)."""
    decoded = CODEC.decode(CODEC.encode({k: delta[k] for k in order}), {k: SPEC[k] for k in order})
    return {k: decoded[k] for k in SPEC}


def _cosine(a: Tensors, b: Tensors) -> float:
    dot = math.fsum(float((a[k].double() * b[k].double()).sum()) for k in a)
    return dot / (_norm(a) * _norm(b))


def test_the_registry_holds_exactly_the_fifteen_behaviours() -> None:
    # Assert
    assert set(ATTACKS) == {
        "nan", "noise", "scaled", "sign-flip", "zero", "stale", "replay", "forged",
        "wrong-base", "alie", "ipm", "label-flip", "copycat", "sybil", "bitflip",
    }  # fmt: skip
    assert len(ATTACKS) == 15


def test_the_honest_round_itself_passes_every_check(tmp_path: Path) -> None:
    # Prepare: the baseline the attacks are judged against must not be rejected on its own
    ctx = _attack_context(tmp_path)
    update = sign_update(ctx.header, ME)
    # Execute
    envelope = check_envelope(update, HONEST_PAYLOAD, _round_context())
    results = round_checks([*OTHERS_HONEST, _decoded(HONEST_PAYLOAD)])
    # Assert
    assert envelope is None
    assert results == [None] * 8


def test_scaled_is_a_hundred_times_the_honest_norm_and_fails_the_norm_check(tmp_path: Path) -> None:
    # Prepare
    update, payload = _single("scaled", _attack_context(tmp_path))
    # Execute
    decoded = _decoded(payload)
    results = norm_check(update_norms([*OTHERS_HONEST, decoded]))
    # Assert
    assert check_envelope(update, payload, _round_context()) is None  # well formed: only the round sees it
    assert _norm(decoded) == pytest.approx(100 * _norm(HONEST), rel=0.05)
    assert _cosine(decoded, HONEST) > 0.99
    assert results[:7] == [None] * 7
    assert isinstance(results[7], Rejection) and results[7].check == "norm"


@pytest.mark.parametrize("name", ["sign-flip", "ipm"])
def test_reversed_updates_fail_the_direction_check(name: str, tmp_path: Path) -> None:
    # Prepare
    update, payload = _single(name, _attack_context(tmp_path))
    factor = {"sign-flip": -4, "ipm": -4}[name]
    # Execute
    decoded, order = _decoded_any_order(payload)
    results = direction_check([*OTHERS_HONEST, decoded])
    # Assert
    assert check_signature(update, payload, _round_context()) is None
    target = _through_codec({k: factor * v for k, v in HONEST.items()}, order)
    assert _norm(decoded) == pytest.approx(_norm(target), rel=0.05)
    assert _cosine(decoded, target) > 0.99
    assert _cosine(decoded, HONEST) < -0.5  # the codec loses more when the tensors come out of order
    assert results[:7] == [None] * 7
    assert isinstance(results[7], Rejection) and results[7].check == "direction"
    assert round_checks([*OTHERS_HONEST, decoded])[7] is not None


def test_noise_is_a_hundred_times_the_honest_norm_in_no_direction_and_is_rejected(tmp_path: Path) -> None:
    # Prepare
    _, payload = _single("noise", _attack_context(tmp_path))
    # Execute
    decoded = _decoded(payload)
    results = round_checks([*OTHERS_HONEST, decoded])
    # Assert
    assert _norm(decoded) > 20 * _norm(HONEST)  # 100x before the codec, which keeps little of white noise
    assert abs(_cosine(decoded, HONEST)) < 0.3
    assert results[:7] == [None] * 7
    assert isinstance(results[7], Rejection) and results[7].check in {"norm", "direction"}
    assert direction_check([*OTHERS_HONEST, decoded], min_cosine=0.5)[7] is not None


def test_zero_carries_nothing_and_fails_the_norm_check(tmp_path: Path) -> None:
    # Prepare
    update, payload = _single("zero", _attack_context(tmp_path))
    # Execute
    decoded = _decoded(payload)
    results = norm_check(update_norms([*OTHERS_HONEST, decoded]))
    # Assert
    assert update.header.tokens == 100 * 4_096  # and claims 100x the credit
    assert _norm(decoded) < 1e-6
    assert results[:7] == [None] * 7
    assert isinstance(results[7], Rejection) and results[7].check == "norm"
    assert "carries ~nothing" in results[7].detail


def test_nan_is_signed_but_refused_when_decoded(tmp_path: Path) -> None:
    # Prepare
    update, payload = _single("nan", _attack_context(tmp_path))
    # Execute
    decoded, rejection = decode_update(payload, codec=CODEC, spec=SPEC)
    # Assert
    assert payload != HONEST_PAYLOAD
    assert check_envelope(update, payload, _round_context()) is None  # the bytes are what it signed
    assert decoded is None
    assert isinstance(rejection, Rejection) and rejection.check in {"decode", "finite"}


def test_forged_is_refused_by_the_signature_check(tmp_path: Path) -> None:
    # Prepare
    update, payload = _single("forged", _attack_context(tmp_path))
    # Execute
    rejection = check_signature(update, payload, _round_context())
    # Assert
    assert update.header.peer_public_key == ME.public_key
    assert payload == HONEST_PAYLOAD
    assert isinstance(rejection, Rejection) and rejection.check == "signature"
    assert check_envelope(update, payload, _round_context()) == rejection


def test_stale_claims_a_wrong_round_then_resends_its_update_of_two_rounds_ago(tmp_path: Path) -> None:
    # Prepare: one adversary across rounds 3, 4 and 5, its memory carried over
    memory: dict[str, Any] = {"colluders": 1}
    contexts = [_attack_context(tmp_path, round=r, memory=memory) for r in (ROUND, ROUND + 1, ROUND + 2)]
    # Execute
    sent = [_single("stale", ctx) for ctx in contexts]
    # Assert
    (first, _), (second, _), (third, third_payload) = sent
    assert (first.header.round, first.header.base_version) == (ROUND - 1, ROUND - 1)
    assert (second.header.round, second.header.base_version) == (ROUND, ROUND)
    assert third.header.round == ROUND  # the honest update it made in round 3
    assert third.header.digest() == memory["history"][0][0].header.digest()
    assert third_payload == HONEST_PAYLOAD
    for update, round in [(first, ROUND), (second, ROUND + 1), (third, ROUND + 2)]:
        assert check_signature(update, HONEST_PAYLOAD, _round_context(round)) is None
        rejection = check_round(update, HONEST_PAYLOAD, _round_context(round))
        assert isinstance(rejection, Rejection) and rejection.check == "round"


def test_stale_in_round_zero_claims_the_next_round(tmp_path: Path) -> None:
    # Prepare
    ctx = _attack_context(tmp_path, round=0)
    # Execute
    update, payload = _single("stale", ctx)
    # Assert
    assert update.header.round == 1
    rejection = check_round(update, payload, _round_context(0))
    assert isinstance(rejection, Rejection) and rejection.check == "round"


def test_replay_resends_the_sniffed_update_then_replays_it_a_round_later(tmp_path: Path) -> None:
    # Prepare
    spool, theirs, their_payload = _spool_with_other(tmp_path)
    memory: dict[str, Any] = {"colluders": 1}
    # Execute
    first, first_payload = _single("replay", _attack_context(tmp_path, spool=spool, memory=memory))
    later, later_payload = _single("replay", _attack_context(tmp_path, round=ROUND + 1, spool=spool, memory=memory))
    # Assert: in round 3 it is the very update the aggregator already has, a retry that counts once
    assert first.to_bytes() == theirs.to_bytes()
    assert first.header.digest() == theirs.header.digest()
    assert first_payload == their_payload
    accepted = _round_context(accepted_digests={OTHER.public_key: theirs.header.digest()})
    assert accepted.accepted_digests[first.header.peer_public_key] == first.header.digest()
    # Assert: in round 4 the captured round-3 update is refused for its round, though genuinely signed
    assert later.to_bytes() == theirs.to_bytes()
    assert later_payload == their_payload
    assert check_signature(later, later_payload, _round_context(ROUND + 1)) is None
    rejection = check_envelope(later, later_payload, _round_context(ROUND + 1))
    assert isinstance(rejection, Rejection) and rejection.check == "round"


def test_replay_with_nothing_to_sniff_claims_the_next_round(tmp_path: Path) -> None:
    # Prepare: the spool holds only this adversary's own update, which it does not replay
    spool = tmp_path / "state"
    _spool_update(spool, _signed(HONEST_PAYLOAD), HONEST_PAYLOAD)
    # Execute
    update, payload = _single("replay", _attack_context(tmp_path, spool=spool))
    # Assert
    assert update.header.peer_public_key == ME.public_key
    assert update.header.round == ROUND + 1
    rejection = check_round(update, payload, _round_context())
    assert isinstance(rejection, Rejection) and rejection.check == "round"


def test_copycat_resigns_another_peers_payload_and_fails_the_replay_check(tmp_path: Path) -> None:
    # Prepare
    spool, theirs, their_payload = _spool_with_other(tmp_path)
    ctx = _round_context(round_payloads={theirs.header.payload_sha256: OTHER.public_key})
    # Execute
    update, payload = _single("copycat", _attack_context(tmp_path, spool=spool))
    # Assert
    assert payload == their_payload
    assert update.header.payload_sha256 == theirs.header.payload_sha256 == hashlib.sha256(payload).digest()
    assert update.header.peer_public_key == ME.public_key
    assert check_signature(update, payload, ctx) is None
    rejection = check_replay(update, payload, ctx)
    assert isinstance(rejection, Rejection) and rejection.check == "replay"
    assert check_envelope(update, payload, ctx) == rejection


def test_sybil_sends_one_payload_under_four_keys_and_only_the_first_gets_through(tmp_path: Path) -> None:
    # Prepare
    memory: dict[str, Any] = {"colluders": 1}
    round_payloads: dict[bytes, bytes] = {}
    ctx = _round_context(round_payloads=round_payloads)
    # Execute: the aggregator records each accepted payload's sender, in arrival order
    uploads = _run("sybil", _attack_context(tmp_path, memory=memory))
    results = []
    for update, payload in uploads:
        rejection = check_envelope(update, payload, ctx)
        if rejection is None:
            round_payloads[update.header.payload_sha256] = update.header.peer_public_key
        results.append(rejection)
    again = _run("sybil", _attack_context(tmp_path, round=ROUND + 1, memory=memory))
    # Assert
    assert len(uploads) == 4
    keys = [u.header.peer_public_key for u, _ in uploads]
    assert len(set(keys)) == 4 and keys[0] == ME.public_key
    assert len({p for _, p in uploads}) == 1
    assert results[0] is None
    assert all(isinstance(r, Rejection) and r.check == "replay" for r in results[1:])
    assert [u.header.peer_public_key for u, _ in again] == keys  # the same sybils every round
    # and the one that got through is a reversed update the round-close checks refuse
    decoded = _decoded(uploads[0][1])
    assert _cosine(decoded, HONEST) < -0.99
    assert round_checks([*OTHERS_HONEST, decoded])[7] is not None


def test_wrong_base_is_far_above_the_honest_norm_and_fails_the_norm_check(tmp_path: Path) -> None:
    # Prepare
    update, payload = _single("wrong-base", _attack_context(tmp_path))
    # Execute
    decoded = _decoded(payload)
    results = norm_check(update_norms([*OTHERS_HONEST, decoded]))
    # Assert
    assert update.header.base_version == ROUND  # it claims the current base
    assert _norm(decoded) > 10 * _norm(HONEST)
    assert isinstance(results[7], Rejection) and results[7].check == "norm"


def test_bitflip_is_refused_as_non_finite_or_by_its_norm(tmp_path: Path) -> None:
    # Prepare
    update, payload = _single("bitflip", _attack_context(tmp_path))
    # Execute
    decoded, rejection = decode_update(payload, codec=CODEC, spec=SPEC)
    # Assert
    assert check_signature(update, payload, _round_context()) is None
    if decoded is None:
        assert isinstance(rejection, Rejection) and rejection.check in {"decode", "finite"}
    else:
        assert all(decoded[k].shape == torch.Size(SPEC[k]) for k in SPEC)
        result = round_checks([*OTHERS_HONEST, decoded])[7]
        assert isinstance(result, Rejection) and result.check == "norm"


def test_label_flip_sends_the_honest_payload_unchanged(tmp_path: Path) -> None:
    # Prepare
    ctx = _attack_context(tmp_path)
    # Execute
    update, payload = _single("label-flip", ctx)
    # Assert: the corruption is in training; the upload itself is a well-formed honest one
    assert payload == HONEST_PAYLOAD
    assert update.header.payload_sha256 == ctx.header.payload_sha256
    assert update.header.tokens == 10 * ctx.header.tokens  # the lever a plain token-weighted mean gives it
    assert check_envelope(update, payload, _round_context()) is None


def _shared_deltas(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "shared" / f"round-{ROUND}").glob("*.safetensors"))


@pytest.mark.parametrize(
    ("name", "expected", "min_cosine"),
    [
        # ALIE's near-constant shift spreads over every DCT coefficient, so its 1% jitter moves the top-k more
        ("alie", lambda v: v - 30 * v.abs().mean() * torch.ones_like(v), 0.8),
        ("ipm", lambda v: -4 * v, 0.99),
    ],
)
def test_colluding_attacks_share_their_honest_delta_and_send_finite_updates(
    name: str, expected: Callable[[torch.Tensor], torch.Tensor], min_cosine: float, tmp_path: Path
) -> None:
    # Prepare
    ctx = _attack_context(tmp_path)
    # Execute
    update, payload = _single(name, ctx)
    # Assert: it wrote its own honest delta for the colluders, under its fingerprint
    files = _shared_deltas(tmp_path)
    assert [p.name for p in files] == [f"{ME.fingerprint}.safetensors"]
    shared = safetensors.torch.load(files[0].read_bytes())
    assert shared.keys() == HONEST.keys()
    assert all(shared[k].equal(HONEST[k]) for k in SPEC)
    # Assert: a finite update of the model's shapes, close to what the strategy says (up to the codec)
    assert check_envelope(update, payload, _round_context()) is None
    decoded, order = _decoded_any_order(payload)
    assert all(decoded[k].shape == torch.Size(SPEC[k]) for k in SPEC)
    target = _through_codec({k: expected(v) for k, v in HONEST.items()}, order)
    assert _cosine(decoded, target) > min_cosine
    assert _norm(decoded) == pytest.approx(_norm(target), rel=0.05)


def test_alie_with_two_colluders_uses_their_mean_and_spread(tmp_path: Path) -> None:
    # Prepare: a colluder has already shared its honest delta for this round
    round_dir = tmp_path / "shared" / f"round-{ROUND}"
    round_dir.mkdir(parents=True)
    (round_dir / f"{OTHER.fingerprint}.safetensors").write_bytes(safetensors.torch.save(OTHERS_HONEST[0]))
    ctx = _attack_context(tmp_path, memory={"colluders": 2})
    # Execute
    _, payload = _single("alie", ctx)
    # Assert
    stacked = {k: torch.stack([HONEST[k], OTHERS_HONEST[0][k]]) for k in SPEC}
    wanted = {k: v.mean(0) - 30 * v.std(0, unbiased=False) for k, v in stacked.items()}
    decoded, order = _decoded_any_order(payload)
    target = _through_codec(wanted, order)
    assert len(_shared_deltas(tmp_path)) == 2
    assert _cosine(decoded, target) > 0.95  # a 1% jitter of its own


# What each attack's uploads meet at the aggregator, judged like it: envelope, decode, then the round.
PIPELINE_VERDICTS: dict[str, set[str]] = {
    "nan": {"decode", "finite"},
    "noise": {"norm", "direction"},
    "scaled": {"norm"},
    "sign-flip": {"norm", "direction"},
    "zero": {"norm"},
    "stale": {"round"},
    "forged": {"signature"},
    "wrong-base": {"norm"},
    "ipm": {"norm", "direction"},
    "copycat": {"replay"},
    "sybil": {"replay", "norm", "direction"},
    "bitflip": {"decode", "finite", "norm"},
}


def _judge(uploads: list[tuple[SignedUpdate, bytes]], ctx: RoundContext) -> list[Rejection | None]:
    """Every upload's first rejection, as the aggregator would reach it, among seven honest updates."""
    round_payloads: dict[bytes, bytes] = dict(ctx.round_payloads)
    ctx = _round_context(accepted_digests=ctx.accepted_digests, round_payloads=round_payloads)
    verdicts: list[Rejection | None] = []
    survivors: dict[int, Tensors] = {}
    for index, (update, payload) in enumerate(uploads):
        rejection = check_envelope(update, payload, ctx)
        if rejection is None:
            round_payloads[update.header.payload_sha256] = update.header.peer_public_key
            decoded, rejection = decode_update(payload, codec=CODEC, spec=SPEC)
            if decoded is not None:
                survivors[index] = decoded
        verdicts.append(rejection)
    closing = round_checks([*OTHERS_HONEST, *survivors.values()])
    assert closing[:7] == [None] * 7, "an honest update was rejected"
    for index, result in zip(survivors, closing[7:], strict=True):
        verdicts[index] = result
    return verdicts


@pytest.mark.parametrize("name", sorted(PIPELINE_VERDICTS))
def test_every_upload_of_a_detectable_attack_is_rejected_by_the_aggregators_checks(name: str, tmp_path: Path) -> None:
    # Prepare
    spool, theirs, _ = _spool_with_other(tmp_path)
    attack_ctx = _attack_context(tmp_path, spool=spool)
    ctx = _round_context(
        accepted_digests={OTHER.public_key: theirs.header.digest()},
        round_payloads={theirs.header.payload_sha256: OTHER.public_key},
    )
    # Execute
    verdicts = _judge(_run(name, attack_ctx), ctx)
    # Assert
    assert all(isinstance(v, Rejection) for v in verdicts), verdicts
    assert {v.check for v in verdicts if v is not None} <= PIPELINE_VERDICTS[name]


@pytest.mark.parametrize("name", ["alie", "ipm"])
def test_colluding_attacks_encode_their_tensors_in_the_models_order(name: str, tmp_path: Path) -> None:
    # Prepare: sixteen rounds, so that a right order by chance (1 in 2 for two tensors) cannot pass for all
    contexts = [_attack_context(tmp_path / str(i)) for i in range(16)]
    # Execute
    payloads = [_single(name, ctx)[1] for ctx in contexts]
    # Assert
    rejections = [decode_update(payload, codec=CODEC, spec=SPEC)[1] for payload in payloads]
    assert rejections == [None] * 16
