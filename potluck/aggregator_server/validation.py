"""Checks every uploaded update passes before the aggregator counts it, cheapest first.

Each check is a small named function that returns None (pass) or a Rejection with a human-readable
detail; the first failure decides, and its name and detail go to the log, the peer's receipt and,
later, the ledger. This issue's checks are the protocol ones (who, which run, which round, how big,
does it decode, is it finite); the statistical checks (norm, direction, held-out loss) join this list.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.codecs import Codec, CodecError
from potluck.protocol.envelope import EnvelopeError, SignedUpdate
from potluck.protocol.identity import fingerprint


@dataclass(frozen=True, kw_only=True, slots=True)
class Rejection:
    """Why an update was refused: the failing check's name and what it saw."""

    check: str  # e.g. "signature", "round", "decode"
    detail: str  # one line for a human

    def __str__(self) -> str:
        return f"{self.check}: {self.detail}"


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundContext:
    """What the checks compare an update against: the run and the round now open."""

    run_id: str
    config_hash: str
    round: int
    version: int
    codec: str  # the run's upload codec name
    max_update_bytes: int
    # public key -> UpdateHeader digest of the update already accepted from it this round
    accepted_digests: Mapping[bytes, bytes]
    now_s: float = 0.0  # the aggregator's clock (Unix seconds)
    timestamp_window_s: float = float("inf")  # how far an update's timestamp may be from now_s
    # nonce -> digest of the accepted update that used it (this round and recent ones)
    seen_nonces: Mapping[bytes, bytes] = field(default_factory=dict)
    # payload sha256 -> public key of the accepted update that carried it, this round
    round_payloads: Mapping[bytes, bytes] = field(default_factory=dict)
    # public key -> the earlier round whose late update holds that key's place this round (late_updates)
    late_slots: Mapping[bytes, int] = field(default_factory=dict)


Check = Callable[[SignedUpdate, bytes, RoundContext], Rejection | None]


def check_signature(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """The header is signed by the key it names, and the payload is the one the header signs."""
    try:
        update.verify()
        update.verify_payload(payload)
    except EnvelopeError as e:
        return Rejection(check="signature", detail=str(e))
    return None


def check_run(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """Same protocol version, run and config as this aggregator."""
    h = update.header
    if h.protocol_version != PROTOCOL_VERSION:
        return Rejection(check="version", detail=f"protocol v{h.protocol_version}, aggregator v{PROTOCOL_VERSION}")
    if h.run_id != ctx.run_id or h.config_hash != ctx.config_hash:
        return Rejection(
            check="run",
            detail=f"update is for run {h.run_id!r} config {h.config_hash[:12]}, not {ctx.config_hash[:12]}",
        )
    return None


def check_round(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """For the open round, trained from the current state version (a late update is stale, not an error)."""
    h = update.header
    if h.round != ctx.round:
        return Rejection(check="round", detail=f"update is for round {h.round}, the open round is {ctx.round}")
    if h.base_version != ctx.version:
        return Rejection(check="stale", detail=f"trained from state v{h.base_version}, current is v{ctx.version}")
    return None


def check_freshness(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """The update was made recently: an old signed update replayed much later is refused outright."""
    skew = update.header.timestamp_s - ctx.now_s
    if abs(skew) > ctx.timestamp_window_s:
        when = "ahead of" if skew > 0 else "behind"
        return Rejection(
            check="freshness",
            detail=f"timestamp is {abs(skew):.0f} s {when} the aggregator's clock "
            f"(window {ctx.timestamp_window_s:.0f} s)",
        )
    return None


def check_replay(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """A nonce used by another update, or a payload another key already sent this round (copycat, sybil)."""
    h = update.header
    digest = h.digest()
    if ctx.seen_nonces.get(h.nonce, digest) != digest:
        return Rejection(check="replay", detail="nonce already used by another update")
    sender = ctx.round_payloads.get(h.payload_sha256)
    if sender is not None and sender != h.peer_public_key:
        return Rejection(
            check="replay", detail=f"the same payload was already sent this round by {fingerprint(sender)}"
        )
    return None


def check_duplicate(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """One update per key per round; the identical update sent again is a retry, handled by the caller."""
    key = update.header.peer_public_key
    previous = ctx.accepted_digests.get(key)
    if previous is not None and previous != update.header.digest():
        if key in ctx.late_slots:  # being slow is no offence: "round" is not a strike, and the peer re-sends the work
            return Rejection(
                check="round",
                detail=f"this key's late update for round {ctx.late_slots[key]} counts in round {ctx.round}; "
                "send this one's work with the next round's update",
            )
        who = fingerprint(key)
        return Rejection(check="duplicate", detail=f"{who} already has an update in round {ctx.round}")
    return None


def check_size(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """The payload fits the run's hard limit and uses the run's codec."""
    if len(payload) > ctx.max_update_bytes:
        return Rejection(check="size", detail=f"{len(payload)} bytes, over the {ctx.max_update_bytes}-byte limit")
    if update.header.codec != ctx.codec:
        return Rejection(check="codec", detail=f"codec {update.header.codec!r}, the run uses {ctx.codec!r}")
    if update.header.tokens == 0 or update.header.inner_steps == 0:
        return Rejection(check="empty", detail="the update claims no tokens or no inner steps")
    return None


ENVELOPE_CHECKS: tuple[Check, ...] = (
    check_signature,
    check_run,
    check_round,
    check_freshness,
    check_replay,
    check_duplicate,
    check_size,
)


def check_envelope(update: SignedUpdate, payload: bytes, ctx: RoundContext) -> Rejection | None:
    """The first failing envelope check, or None: everything short of decoding the payload."""
    for check in ENVELOPE_CHECKS:
        rejection = check(update, payload, ctx)
        if rejection is not None:
            return rejection
    return None


def decode_update(
    payload: bytes, *, codec: Codec, spec: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor] | None, Rejection | None]:
    """Decode a payload against the model's names and shapes, and refuse non-finite values."""
    try:
        decoded = codec.decode(payload, spec)
    except CodecError as e:
        return None, Rejection(check="decode", detail=str(e))
    for name, tensor in decoded.items():
        if not torch.isfinite(tensor).all():
            return None, Rejection(check="finite", detail=f"tensor {name!r} has NaN or infinite values")
    total = math.fsum(float(t.double().square().sum()) for t in decoded.values())
    if not math.isfinite(total):
        return None, Rejection(check="finite", detail="the update's norm overflows")
    return decoded, None
