"""Misbehaviours for the red-team harness: each a named strategy that turns a round's honest work into a bad update.

RED TEAM ONLY: the normal peer never imports this package. An adversarial peer (redteam/peer.py)
trains like an honest one, then hands its honest work to one of these strategies, which returns
the (signed update, payload) it actually sends. Colluding adversaries share what they need through
a directory (`AttackContext.shared`); attacks that need someone else's traffic read the aggregator's
spool of the open round, standing in for a sniffer on the path.

Behaviours (issue 4): nan, noise, scaled, sign-flip, zero, stale, replay, forged, wrong-base, alie,
ipm, label-flip, copycat, sybil, bitflip.
"""

import dataclasses
import hashlib
import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from potluck.protocol.envelope import SignedUpdate, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity, generate_identity

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass(kw_only=True)
class AttackContext:
    """What a strategy may use: the honest round, the adversary's identity, and the colluders' channels."""

    identity: Identity
    header: UpdateHeader  # the honest header this peer would send (signed by `identity`)
    payload: bytes  # the honest payload
    decode: Callable[[bytes], Tensors]  # payload -> delta, as the aggregator decodes it
    encode: Callable[[Tensors], bytes]  # delta -> payload, with the run's codec, no error feedback
    fresh_delta: Callable[[], Tensors]  # a delta trained from a freshly initialised model (wrong base)
    shared: Path  # a directory all colluding adversaries can read and write
    spool: Path | None  # the aggregator's spool directory (what a sniffer on the path would see)
    memory: dict[str, Any] = field(default_factory=dict)  # this adversary's state across rounds
    strength: float = 1.0  # scales the attack (see each strategy)


Attack = Callable[[AttackContext], list[tuple[SignedUpdate, bytes]]]
ATTACKS: dict[str, Attack] = {}


def attack(name: str) -> Callable[[Attack], Attack]:
    """Register a strategy under its behaviour name."""

    def register(fn: Attack) -> Attack:
        ATTACKS[name] = fn
        return fn

    return register


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm of a set of tensors taken as one vector, in float64."""
    return math.sqrt(sum(float(v.double().square().sum()) for v in tensors.values()))


def _send(ctx: AttackContext, payload: bytes, *, identity: Identity | None = None, **changes: Any) -> SignedUpdate:
    signer = identity or ctx.identity
    header = dataclasses.replace(
        ctx.header,
        peer_public_key=signer.public_key,
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=time.time(),
        **changes,
    )
    return sign_update(header, signer)


def _with(ctx: AttackContext, delta: Tensors) -> list[tuple[SignedUpdate, bytes]]:
    payload = ctx.encode(delta)
    return [(_send(ctx, payload), payload)]


@attack("scaled")
def scaled(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """The honest update times 100 (x strength): one peer tries to own the round."""
    return _with(ctx, {k: v * 100 * ctx.strength for k, v in ctx.decode(ctx.payload).items()})


@attack("sign-flip")
def sign_flip(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """The honest update reversed and amplified (x4 x strength): pushes the model uphill."""
    return _with(ctx, {k: -4 * ctx.strength * v for k, v in ctx.decode(ctx.payload).items()})


@attack("noise")
def noise(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Gaussian noise 100x (x strength) the honest update's norm (10x barely moves the tiny model: +3%)."""
    honest = ctx.decode(ctx.payload)
    norm = _norm(honest)
    generator = torch.Generator().manual_seed(int.from_bytes(ctx.header.nonce[:4], "big"))
    raw = {k: torch.randn(v.shape, generator=generator) for k, v in honest.items()}
    raw_norm = _norm(raw)
    return _with(ctx, {k: v * (100 * ctx.strength * norm / raw_norm) for k, v in raw.items()})


@attack("zero")
def zero(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """A free rider: nothing useful (a whisper of noise), claiming 100x (x strength) the tokens it could train.

    Claiming much is what a free rider is after (credit follows tokens); under a plain token-weighted
    mean it also buys the zeros most of the say, which stalls the run.
    """
    honest = ctx.decode(ctx.payload)
    generator = torch.Generator().manual_seed(int.from_bytes(ctx.header.nonce[:4], "big"))
    payload = ctx.encode({k: 1e-12 * torch.randn(v.shape, generator=generator) for k, v in honest.items()})
    claimed = max(1, round(ctx.header.tokens * 100 * ctx.strength))
    return [(_send(ctx, payload, tokens=claimed), payload)]


@attack("nan")
def nan(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """NaN where the payload's scales are: the run's codec refuses to encode NaN, so the bytes are patched."""
    return [(_send(ctx, p := _patch_arrays(ctx.payload, _nan_scales)), p)]


@attack("bitflip")
def bitflip(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Failing hardware: random bit flips in 1% (x strength) of the delta's float32 values."""
    honest = ctx.decode(ctx.payload)
    rng = np.random.default_rng(int.from_bytes(ctx.header.nonce[:4], "big"))
    flipped = {}
    for name, tensor in honest.items():
        raw = tensor.detach().clone().contiguous().view(-1).numpy().view(np.uint32)
        hit = rng.random(raw.size) < 0.01 * ctx.strength
        raw[hit] ^= np.uint32(1) << rng.integers(20, 31, size=int(hit.sum()), dtype=np.uint32)  # exponent bits
        values = torch.from_numpy(raw.view(np.float32).copy()).view(tensor.shape)
        flipped[name] = torch.nan_to_num(values, nan=0.0, posinf=1e30, neginf=-1e30).clamp(-1e30, 1e30)
    return _with(ctx, flipped)


@attack("forged")
def forged(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """The honest update under this peer's key, but signed by another key."""
    update = _send(ctx, ctx.payload)
    impostor = generate_identity()
    return [(SignedUpdate(header=update.header, signature=impostor.sign(update.header.signed_bytes())), ctx.payload)]


@attack("stale")
def stale(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Re-sends its own update of two rounds ago (honest in its day); before it has one, claims the wrong round."""
    history: list[tuple[SignedUpdate, bytes]] = ctx.memory.setdefault("history", [])
    history.append((_send(ctx, ctx.payload), ctx.payload))
    if len(history) >= 3:
        return [history[-3]]
    h = ctx.header
    wrong: dict[str, Any] = (
        {"round": h.round - 1, "base_version": h.base_version - 1} if h.round > 0 else {"round": h.round + 1}
    )
    return [(_send(ctx, ctx.payload, **wrong), ctx.payload)]


@attack("wrong-base")
def wrong_base(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Trained from a different state: the delta of a model of its own, 5x (x strength) away, for this base.

    Each adversary's other state is its own (seeded by its key), as stale checkouts would differ.
    """
    return _with(ctx, {k: v * 5 * ctx.strength for k, v in ctx.fresh_delta().items()})


@attack("label-flip")
def label_flip(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Trains honestly on corrupted targets (the peer's trainer maps each next byte b to 255 - b).

    It sends that work as is, claiming 10x (x strength) the tokens: the one lever a plain token-weighted
    mean gives a data poisoner, and what a token cap takes away.
    """
    claimed = max(1, round(ctx.header.tokens * 10 * ctx.strength))
    return [(_send(ctx, ctx.payload, tokens=claimed), ctx.payload)]


def _spooled(ctx: AttackContext, *, wait_s: float = 0.0) -> list[tuple[SignedUpdate, bytes]]:
    """Other peers' updates of the open round, as a sniffer would have seen them (waiting up to wait_s for one)."""
    if ctx.spool is None:
        return []
    round_dir = ctx.spool / "spool" / f"round-{ctx.header.round}"
    deadline = time.monotonic() + wait_s
    while not list(round_dir.glob("*.update")) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = []
    for path in sorted(round_dir.glob("*.update")):
        data = path.read_bytes()
        (length,) = struct.unpack(">Q", data[:8])
        update = SignedUpdate.from_bytes(data[8 : 8 + length])
        if update.header.peer_public_key != ctx.identity.public_key:
            found.append((update, data[8 + length :]))
    return found


@attack("replay")
def replay(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Re-sends another peer's signed update captured in an earlier round; in the first round, this round's.

    A same-round replay is the very update the aggregator already has: it must not count twice.
    """
    captured = ctx.memory.get("captured")
    now = _spooled(ctx, wait_s=10)[:1]
    ctx.memory["captured"] = now or captured
    return captured or now or [(_send(ctx, ctx.payload, round=ctx.header.round + 1), ctx.payload)]


@attack("copycat")
def copycat(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Re-signs another peer's payload of this round under its own key, to be paid for their work."""
    others = _spooled(ctx, wait_s=10)
    if not others:
        return [(_send(ctx, ctx.payload), ctx.payload)]
    _, payload = others[0]
    return [(_send(ctx, payload), payload)]


def _colluders_mean_std(ctx: AttackContext) -> tuple[Tensors, Tensors]:
    """Mean and std of the colluders' honest deltas this round (each adversary writes its own, then waits)."""
    round_dir = ctx.shared / f"round-{ctx.header.round}"
    round_dir.mkdir(parents=True, exist_ok=True)
    mine = round_dir / f"{ctx.identity.fingerprint}.safetensors"
    tmp = mine.with_suffix(".tmp")
    tmp.write_bytes(safetensors.torch.save(ctx.decode(ctx.payload)))
    tmp.replace(mine)
    deadline = time.monotonic() + 10  # colluders finish their honest work at about the same time
    while len(list(round_dir.glob("*.safetensors"))) < ctx.memory.get("colluders", 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    deltas = [safetensors.torch.load(p.read_bytes()) for p in sorted(round_dir.glob("*.safetensors"))]
    names = list(ctx.decode(ctx.payload))  # the model's order: safetensors gives no order, payloads need it
    stacked = {k: torch.stack([d[k] for d in deltas]) for k in names}
    mean = {k: v.mean(0) for k, v in stacked.items()}
    # One colluder alone has no spread to measure: it uses the mean magnitude as its per-coordinate scale.
    std = {
        k: v.std(0, unbiased=False) if v.shape[0] > 1 else v.abs().mean() * torch.ones_like(v[0])
        for k, v in stacked.items()
    }
    return mean, std


def _own(ctx: AttackContext, delta: Tensors) -> Tensors:
    """A colluder's copy of the shared malicious delta, 1% jitter of its own: identical payloads are replays."""
    generator = torch.Generator().manual_seed(int.from_bytes(ctx.identity.public_key[:4], "big"))
    return {k: v * (1 + 0.01 * torch.randn(v.shape, generator=generator)) for k, v in delta.items()}


@attack("alie")
def alie(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """A Little Is Enough (Baruch et al. 2019): mean - z * std of the colluders' honest work, z = 30 x strength.

    At the paper's z of about 1.5 (strength 0.05), 2 of 8 peers do no measurable harm to the tiny run even
    under a plain mean (-2% in 6 rounds); z = 30 is where it first does (+23%), so that is the default.
    """
    mean, std = _colluders_mean_std(ctx)
    return _with(ctx, _own(ctx, {k: mean[k] - 30 * ctx.strength * std[k] for k in mean}))


@attack("ipm")
def ipm(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Inner-product manipulation (Xie et al. 2019): -epsilon x the colluders' honest mean, epsilon = 4 x strength.

    With 2 of 8 peers, epsilon above 3 turns the plain mean's step uphill.
    """
    mean, _ = _colluders_mean_std(ctx)
    return _with(ctx, _own(ctx, {k: -4 * ctx.strength * v for k, v in mean.items()}))


@attack("sybil")
def sybil(ctx: AttackContext) -> list[tuple[SignedUpdate, bytes]]:
    """Several keys sending one identical (sign-flipped) update: three extra keys per adversary."""
    keys: list[Identity] = ctx.memory.setdefault("sybils", [generate_identity() for _ in range(3)])
    payload = ctx.encode({k: -4 * ctx.strength * v for k, v in ctx.decode(ctx.payload).items()})
    return [(_send(ctx, payload, identity=who), payload) for who in [ctx.identity, *keys]]


def _nan_scales(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    patched = dict(arrays)
    if "scales" in patched:
        patched["scales"] = np.full_like(patched["scales"], 0x7FC0)  # bf16 NaN
    else:
        first = next(iter(patched))
        patched[first] = np.full_like(patched[first], np.nan) if patched[first].dtype.kind == "f" else patched[first]
    return patched


def _patch_arrays(payload: bytes, patch: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> bytes:
    """Rewrite a codec payload's arrays in place of its safetensors body (PLKC framing kept)."""
    prefix = struct.Struct("<4sBI")
    _, _, header_len = prefix.unpack_from(payload)
    head = payload[: prefix.size + header_len]
    arrays = safetensors.numpy.load(payload[prefix.size + header_len :])
    return head + safetensors.numpy.save(patch(dict(arrays)))


def digest_hex(update: SignedUpdate) -> str:
    """The short name events use for an upload."""
    return hashlib.sha256(update.header.signed_bytes()).hexdigest()[:16]
