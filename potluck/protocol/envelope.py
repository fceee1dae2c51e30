"""Signed messages of a round: a peer's update, the aggregator's aggregate, the receipt for a contribution,
and the full state a joining peer downloads.

Each message is a header (a frozen dataclass, validated on construction) plus an Ed25519 signature
kept outside it. The payload (codec bytes) travels beside the header; the header binds it by length
and sha256, so a signature over a few hundred header bytes covers megabytes of payload.

Canonical bytes: the header's fields, in declaration order, as one msgpack array (`use_bin_type`,
floats as float64, ints in msgpack's shortest form). The same header always gives the same bytes,
and `from_bytes(to_bytes(x)) == x`. Field order is the wire order: never reorder, only append,
and bump PROTOCOL_VERSION when you do.

What is signed: a domain tag + the canonical bytes, e.g. `b"potluck/update/v1\\0" + body`, so a
signature over one kind of message can never verify as another kind.

Wire form of a signed message: msgpack `[kind, [header fields...], signature]`, with `kind` like
"potluck/update". Decoding hostile bytes raises EnvelopeError and nothing else; every msgpack
array is at most 16 long, so a small hostile message cannot make the decoder allocate much.
"""

import hashlib
import math
import os
from collections.abc import Callable, Collection
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar, TypeVar

import msgpack

from potluck.errors import PotluckError
from potluck.protocol import PROTOCOL_VERSION, UPGRADE_HINT
from potluck.protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, fingerprint, verify_signature

NONCE_BYTES = 16  # 128 random bits: nonces never repeat by chance across all peers and rounds
SHA256_BYTES = 32
MAX_RUN_ID_CHARS = 128
MAX_CODEC_CHARS = 64
MAX_REASON_CHARS = 512
MAX_CONTRIBUTORS = 10_000
_CONTRIBUTOR_BYTES = PUBLIC_KEY_BYTES + 8  # on the wire: public key + tokens as uint64 big-endian
_MAX_INT = 2**63 - 1  # SQLite INTEGER is int64: every count must fit the ledger
_MAX_ARRAY_LEN = 16  # longest msgpack array in any message (the UpdateHeader's 13 fields)
# Default wire size limits: real headers are ~300 bytes; an aggregate lists up to 10k contributors at 40 bytes each.
MAX_UPDATE_ENVELOPE_BYTES = 4096
MAX_RECEIPT_ENVELOPE_BYTES = 4096
MAX_STATE_ENVELOPE_BYTES = 4096
MAX_AGGREGATE_ENVELOPE_BYTES = MAX_CONTRIBUTORS * _CONTRIBUTOR_BYTES + 4096
# A Merkle inclusion proof (incentives/merkle.py): version, leaf index, leaf count, then at most 64 hashes.
MAX_MERKLE_PROOF_BYTES = 1 + 8 + 8 + 64 * SHA256_BYTES


class EnvelopeError(PotluckError):
    """A message is malformed, from another protocol version, or fails verification (one-line message)."""


def new_nonce() -> bytes:
    """16 fresh random bytes for UpdateHeader.nonce, so that a replayed upload is recognisable."""
    return os.urandom(NONCE_BYTES)


def payload_digest(payload: bytes) -> bytes:
    """The sha256 of a payload, as headers carry it (raw 32 bytes)."""
    return hashlib.sha256(payload).digest()


def _version_mismatch(version: int) -> str:
    if version > PROTOCOL_VERSION:
        fix = UPGRADE_HINT
    else:
        fix = "the peer must upgrade potluck"
    return f"peer speaks protocol v{version}, this node speaks v{PROTOCOL_VERSION}; {fix}"


def _fail(obj: object, name: str, expected: str) -> EnvelopeError:
    value = getattr(obj, name)
    return EnvelopeError(f"{type(obj).__name__}.{name} must be {expected}, got {value!r:.60}")


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT


def _is_bytes(length: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, bytes) and len(value) == length


def _is_text(max_chars: int, *, min_chars: int = 1) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and min_chars <= len(value) <= max_chars and value.isprintable()


def _is_contributors(value: Any) -> bool:
    if not isinstance(value, list | tuple) or len(value) > MAX_CONTRIBUTORS:
        return False
    for pair in value:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and _is_bytes(PUBLIC_KEY_BYTES)(pair[0])):
            return False
        if not _is_count(pair[1]):
            return False
    return len({key for key, _ in value}) == len(value)


def _is_density(value: Any) -> bool:
    return type(value) is float and 0.0 <= value <= 1.0


_COUNT = (_is_count, "an integer in [0, 2^63)")
_KEY = (_is_bytes(PUBLIC_KEY_BYTES), f"a raw Ed25519 public key ({PUBLIC_KEY_BYTES} bytes)")
_SHA256 = (_is_bytes(SHA256_BYTES), f"a raw sha256 ({SHA256_BYTES} bytes)")
# One rule per field name, shared by every message: a field means the same thing wherever it appears.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run_id": (_is_text(MAX_RUN_ID_CHARS), f"printable text of 1 to {MAX_RUN_ID_CHARS} characters"),
    "config_hash": (
        lambda v: isinstance(v, str) and len(v) == 2 * SHA256_BYTES and not v.strip("0123456789abcdef"),
        "a sha256 as 64 lowercase hex characters",
    ),
    "round": _COUNT,
    "base_version": _COUNT,
    "new_version": _COUNT,
    "tokens": _COUNT,
    "inner_steps": _COUNT,
    "payload_bytes": _COUNT,
    "chunk_bytes": _COUNT,
    "shard": _COUNT,
    "chunks_sha256": _SHA256,
    "tokens_credited": _COUNT,
    "peer_public_key": _KEY,
    "aggregator_public_key": _KEY,
    "payload_sha256": _SHA256,
    "state_sha256": _SHA256,
    "update_sha256": _SHA256,
    "nonce": (_is_bytes(NONCE_BYTES), f"{NONCE_BYTES} random bytes"),
    "codec": (_is_text(MAX_CODEC_CHARS), f"printable text of 1 to {MAX_CODEC_CHARS} characters"),
    "reason": (_is_text(MAX_REASON_CHARS, min_chars=0), f"printable text of at most {MAX_REASON_CHARS} characters"),
    "accepted": (lambda v: type(v) is bool, "True or False"),
    "timestamp_s": (
        lambda v: type(v) is float and math.isfinite(v) and v >= 0,
        "a finite float >= 0 (seconds since the Unix epoch)",
    ),
    "updates_root": _SHA256,
    "ledger_head": _SHA256,
    "score": (lambda v: type(v) is float and math.isfinite(v) and v >= 0, "a finite float >= 0"),
    "ledger_row_hash": (
        lambda v: isinstance(v, bytes) and len(v) in (0, SHA256_BYTES),
        f"empty (not yet in the ledger) or a raw sha256 ({SHA256_BYTES} bytes)",
    ),
    "merkle_proof": (
        lambda v: isinstance(v, bytes) and len(v) <= MAX_MERKLE_PROOF_BYTES,
        f"at most {MAX_MERKLE_PROOF_BYTES} bytes",
    ),
    "next_density": (_is_density, "a float in [0, 1]"),
    "density": (_is_density, "a float in [0, 1]"),
    "contributors": (
        _is_contributors,
        f"at most {MAX_CONTRIBUTORS} (32-byte public key, tokens in [0, 2^63)) pairs with unique keys",
    ),
}


def _fields_of(obj: Any) -> tuple[Field[Any], ...]:
    """The dataclass fields of a header or signed wrapper, instance or class.

    The two mixins below are only ever mixed into frozen dataclasses, which a type checker cannot see
    from inside the mixin.
    """
    return fields(obj)


class _SignedBody:
    """What the three headers share: canonical bytes, domain-separated signing bytes, a digest."""

    __slots__ = ()
    DOMAIN: ClassVar[bytes]  # prefix of the signed bytes, unique per message kind
    KIND: ClassVar[str]  # first element of the wire form, unique per message kind
    protocol_version: int  # each header's first field

    def __post_init__(self) -> None:
        version = self.protocol_version
        if type(version) is not int:
            raise _fail(self, "protocol_version", "an integer")
        if version != PROTOCOL_VERSION:
            raise EnvelopeError(_version_mismatch(version))
        for field in _fields_of(self)[1:]:
            is_valid, expected = _RULES[field.name]
            if not is_valid(getattr(self, field.name)):
                raise _fail(self, field.name, expected)

    def _wire_fields(self) -> list[Any]:
        return [getattr(self, f.name) for f in _fields_of(self)]

    @classmethod
    def _from_wire_fields(cls, values: list[Any]) -> Any:
        return cls(**{f.name: value for f, value in zip(_fields_of(cls), values, strict=True)})

    def canonical_bytes(self) -> bytes:
        """The header's deterministic msgpack encoding (see the module docstring)."""
        return msgpack.packb(self._wire_fields(), use_bin_type=True, use_single_float=False)

    def signed_bytes(self) -> bytes:
        """Exactly what the signature covers: the kind's domain tag + canonical bytes."""
        return self.DOMAIN + self.canonical_bytes()

    def digest(self) -> bytes:
        """sha256 of the signed bytes: names this message, e.g. in Receipt.update_sha256 and in replay checks."""
        return hashlib.sha256(self.signed_bytes()).digest()


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateHeader(_SignedBody):
    """What a peer signs about one uploaded pseudo-gradient (DESIGN.md, "One round, as data", step 4)."""

    DOMAIN: ClassVar[bytes] = b"potluck/update/v1\0"
    KIND: ClassVar[str] = "potluck/update"

    protocol_version: int = PROTOCOL_VERSION
    run_id: str
    config_hash: str  # sha256 hex of the RunConfig: a changed config is a different run
    round: int  # outer round this update is for
    base_version: int  # version of the master state the peer trained from; stale bases are rejected
    peer_public_key: bytes  # raw Ed25519 key; the signature must verify under it
    tokens: int  # tokens trained this round: the aggregation weight and the ledger credit claimed
    inner_steps: int  # inner optimizer steps taken (slow peers take fewer)
    codec: str  # codec registry id that decodes the payload
    payload_bytes: int
    payload_sha256: bytes  # binds the payload to this signature
    nonce: bytes  # random (new_nonce): two uploads never share a digest, so a replay is recognisable
    timestamp_s: float  # sender's Unix time, for coarse freshness checks only (clocks differ)


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregateHeader(_SignedBody):
    """What an aggregator signs about one round's published aggregate and the master state it produced."""

    DOMAIN: ClassVar[bytes] = b"potluck/aggregate/v1\0"
    KIND: ClassVar[str] = "potluck/aggregate"

    protocol_version: int = PROTOCOL_VERSION
    run_id: str
    config_hash: str  # sha256 hex of the RunConfig
    round: int  # the round this aggregate closes
    new_version: int  # master state version after applying it
    aggregator_public_key: bytes  # must be one of the run config's trusted aggregator keys
    codec: str  # codec registry id that decodes the payload
    payload_bytes: int
    payload_sha256: bytes
    state_sha256: bytes  # checksum of the master state after applying: peers compare theirs to detect drift
    # (peer public key, tokens credited) per accepted update, sorted by key, unique; normalised on construction.
    # On the wire: one bin of 40-byte records (key + uint64 big-endian), so no msgpack array is ever long.
    contributors: tuple[tuple[bytes, int], ...] = ()
    timestamp_s: float
    # Merkle root (incentives/merkle.py) of the UpdateHeader digests this aggregate combined: a receipt's
    # inclusion proof checks against it, so crediting one set of updates and applying another is evident.
    updates_root: bytes
    ledger_head: bytes  # the ledger's chain head after this round's rows: the aggregate commits to the ledger
    # The upload density of the next round (protocol/density.py); 0.0 when the upload codec has none.
    next_density: float = 0.0

    def __post_init__(self) -> None:
        _SignedBody.__post_init__(self)  # not super(): see _from_wire_fields
        object.__setattr__(self, "contributors", tuple(sorted((key, tokens) for key, tokens in self.contributors)))

    def _wire_fields(self) -> list[Any]:
        values = _SignedBody._wire_fields(self)
        values[_CONTRIBUTORS_INDEX] = b"".join(key + tokens.to_bytes(8, "big") for key, tokens in self.contributors)
        return values

    @classmethod
    def _from_wire_fields(cls, values: list[Any]) -> "AggregateHeader":
        packed = values[_CONTRIBUTORS_INDEX]
        if not isinstance(packed, bytes) or len(packed) % _CONTRIBUTOR_BYTES:
            raise EnvelopeError(
                f"aggregate contributors must be {_CONTRIBUTOR_BYTES}-byte records, got {packed!r:.60}"
            )
        records = (packed[i : i + _CONTRIBUTOR_BYTES] for i in range(0, len(packed), _CONTRIBUTOR_BYTES))
        values = list(values)
        values[_CONTRIBUTORS_INDEX] = tuple(
            (record[:PUBLIC_KEY_BYTES], int.from_bytes(record[PUBLIC_KEY_BYTES:], "big")) for record in records
        )
        # Not super(): slots=True rebuilds the class, which breaks zero-argument super() in Python < 3.14.
        return cls(**{f.name: value for f, value in zip(fields(cls), values, strict=True)})


@dataclass(frozen=True, kw_only=True, slots=True)
class Receipt(_SignedBody):
    """An aggregator's signed statement of what it did with one peer's update: the volunteer's proof of work."""

    DOMAIN: ClassVar[bytes] = b"potluck/receipt/v1\0"
    KIND: ClassVar[str] = "potluck/receipt"

    protocol_version: int = PROTOCOL_VERSION
    run_id: str
    config_hash: str  # sha256 hex of the RunConfig
    round: int
    peer_public_key: bytes  # whose update this is about
    aggregator_public_key: bytes  # who decided, and signs this receipt
    update_sha256: bytes  # UpdateHeader.digest() of the update: which upload this receipt answers
    tokens_credited: int  # tokens written to the ledger (may be capped below the claimed tokens)
    accepted: bool
    reason: str = ""  # why the update was rejected, or a note; "" when there is nothing to say
    timestamp_s: float
    # Final receipts (issued once the round closed and its ledger rows are durable) fill these; the receipt
    # that answers an upload on arrival leaves them empty: it only says the update passed the arrival checks.
    score: float = 0.0  # points credited in the ledger (incentives/scoring.py)
    ledger_row_hash: bytes = b""  # the update's ledger row hash
    merkle_proof: bytes = b""  # inclusion proof of update_sha256 under the round's AggregateHeader.updates_root

    @property
    def is_final(self) -> bool:
        """Whether this is the round-close receipt (in the ledger) rather than the arrival acknowledgement."""
        return bool(self.ledger_row_hash)


@dataclass(frozen=True, kw_only=True, slots=True)
class StateHeader(_SignedBody):
    """An aggregator's statement about the full run state it serves to joiners and drifted peers.

    The payload is a safetensors file (master parameters, outer-optimizer state, the RunConfig in
    its metadata); peers check the payload against this header and the parameters against
    state_sha256 before training on them.
    """

    DOMAIN: ClassVar[bytes] = b"potluck/state/v1\0"
    KIND: ClassVar[str] = "potluck/state"

    protocol_version: int = PROTOCOL_VERSION
    run_id: str
    config_hash: str  # sha256 hex of the RunConfig carried in the payload
    round: int  # the round now open: the peer contributes to it next
    new_version: int  # master state version of the parameters in the payload
    aggregator_public_key: bytes  # who serves and signs this state
    shard: int  # which shard of the model (protocol/shards.py) the payload holds; 0 in a run of one
    payload_bytes: int
    payload_sha256: bytes
    chunk_bytes: int  # the payload is fetched in chunks of this size (protocol/state_chunks.py)
    chunks_sha256: bytes  # state_chunks.digests_sha256 of the chunks' sha256s: the signed chunk manifest
    state_sha256: bytes  # diloco.state_sha256 of the master parameters in the payload
    timestamp_s: float
    density: float = 0.0  # the open round's upload density (protocol/density.py); 0.0 when the codec has none


_CONTRIBUTORS_INDEX = [f.name for f in fields(AggregateHeader)].index("contributors")


def _decode(data: bytes, body_type: type[_SignedBody], *, max_bytes: int) -> tuple[Any, Any]:
    """Parse a signed message's wire form into (header, signature); any problem is an EnvelopeError."""
    kind = body_type.KIND
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError(f"{kind} envelope must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise EnvelopeError(f"{kind} envelope is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        outer = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=4 * MAX_REASON_CHARS,  # UTF-8 takes at most 4 bytes a character
            max_bin_len=max_bytes,
            max_array_len=_MAX_ARRAY_LEN,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types (ValueError, StackError, UnicodeDecodeError, ...)
        raise EnvelopeError(
            f"{kind} envelope is not valid msgpack ({type(e).__name__}); truncated or corrupted"
        ) from e
    if not (isinstance(outer, list) and len(outer) == 3 and isinstance(outer[1], list) and outer[1]):
        raise EnvelopeError(f"{kind} envelope must be [kind, [header fields], signature]; got something else")
    found_kind, values, signature = outer
    if found_kind != kind:
        raise EnvelopeError(f"expected a {kind} envelope, got {found_kind!r:.40}")
    if type(values[0]) is int and values[0] != PROTOCOL_VERSION:  # before any other check: v2 may differ anywhere
        raise EnvelopeError(_version_mismatch(values[0]))
    expected_count = len(_fields_of(body_type))
    if len(values) != expected_count:
        raise EnvelopeError(f"{kind} header has {len(values)} fields, expected {expected_count}")
    return body_type._from_wire_fields(values), signature


def _verify(body: Any, signature: bytes, public_key: bytes, signer: str) -> None:
    if not verify_signature(public_key, signature, body.signed_bytes()):
        raise EnvelopeError(
            f"{body.KIND} round {body.round}: signature does not verify under {signer} {fingerprint(public_key)}; "
            "tampered with, or signed by another key"
        )


def _verify_payload(header: UpdateHeader | AggregateHeader | StateHeader, payload: bytes) -> None:
    if len(payload) != header.payload_bytes:
        raise EnvelopeError(
            f"{header.KIND} payload is {len(payload)} bytes, the signed header says {header.payload_bytes}"
        )
    if payload_digest(payload) != header.payload_sha256:
        raise EnvelopeError(
            f"{header.KIND} payload sha256 does not match the signed header; corrupted or tampered with"
        )


_S = TypeVar("_S", bound="_Signed")


class _Signed:
    """What the signed wrappers share: the signed body is their first field, the signature their second."""

    __slots__ = ()
    BODY: ClassVar[type[_SignedBody]]  # the header type this wrapper carries
    MAX_BYTES: ClassVar[int]  # from_bytes' default size limit for this kind
    signature: bytes

    @property
    def _body(self) -> Any:
        return getattr(self, _fields_of(self)[0].name)

    def __post_init__(self) -> None:
        if not isinstance(self._body, self.BODY):
            raise _fail(self, _fields_of(self)[0].name, f"a {self.BODY.__name__}")
        if not _is_bytes(SIGNATURE_BYTES)(self.signature):
            raise _fail(self, "signature", f"an Ed25519 signature ({SIGNATURE_BYTES} bytes)")

    def to_bytes(self) -> bytes:
        """The wire form `[kind, [header fields], signature]` (see the module docstring)."""
        return msgpack.packb([self.BODY.KIND, self._body._wire_fields(), self.signature], use_bin_type=True)

    @classmethod
    def from_bytes(cls: type[_S], data: bytes, *, max_bytes: int | None = None) -> _S:
        """Parse untrusted bytes (at most `max_bytes`, default MAX_BYTES); raise EnvelopeError if malformed.

        Parsing does not verify: call verify() before trusting anything in it.
        """
        body, signature = _decode(data, cls.BODY, max_bytes=cls.MAX_BYTES if max_bytes is None else max_bytes)
        return cls(**{_fields_of(cls)[0].name: body, "signature": signature})


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedUpdate(_Signed):
    """A peer's UpdateHeader with the peer's signature over it."""

    BODY: ClassVar[type[_SignedBody]] = UpdateHeader
    MAX_BYTES: ClassVar[int] = MAX_UPDATE_ENVELOPE_BYTES

    header: UpdateHeader
    signature: bytes  # Ed25519 over header.signed_bytes() by header.peer_public_key

    def verify(self) -> None:
        """Raise EnvelopeError unless the signature is the header's peer's. Who may contribute is the caller's call."""
        _verify(self.header, self.signature, self.header.peer_public_key, "peer")

    def verify_payload(self, payload: bytes) -> None:
        """Raise EnvelopeError unless `payload` has the signed length and sha256."""
        _verify_payload(self.header, payload)


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedAggregate(_Signed):
    """An aggregator's AggregateHeader with its signature over it."""

    BODY: ClassVar[type[_SignedBody]] = AggregateHeader
    MAX_BYTES: ClassVar[int] = MAX_AGGREGATE_ENVELOPE_BYTES

    header: AggregateHeader
    signature: bytes  # Ed25519 over header.signed_bytes() by header.aggregator_public_key

    def verify(self, allowed_keys: Collection[bytes]) -> None:
        """Raise EnvelopeError unless signed by one of `allowed_keys` (the run config's trusted aggregators)."""
        key = self.header.aggregator_public_key
        if key not in allowed_keys:
            raise EnvelopeError(
                f"aggregate for round {self.header.round} is signed by {fingerprint(key)}, which is not one of the "
                f"run's {len(allowed_keys)} trusted aggregator keys; check that this node uses the run's config"
            )
        _verify(self.header, self.signature, key, "aggregator")

    def verify_payload(self, payload: bytes) -> None:
        """Raise EnvelopeError unless `payload` has the signed length and sha256."""
        _verify_payload(self.header, payload)


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedState(_Signed):
    """An aggregator's StateHeader with its signature over it."""

    BODY: ClassVar[type[_SignedBody]] = StateHeader
    MAX_BYTES: ClassVar[int] = MAX_STATE_ENVELOPE_BYTES

    header: StateHeader
    signature: bytes  # Ed25519 over header.signed_bytes() by header.aggregator_public_key

    def verify(self, allowed_keys: Collection[bytes]) -> None:
        """Raise EnvelopeError unless signed by one of `allowed_keys` (the run config's trusted aggregators)."""
        key = self.header.aggregator_public_key
        if key not in allowed_keys:
            raise EnvelopeError(
                f"state for round {self.header.round} is signed by {fingerprint(key)}, which is not one of the "
                f"run's {len(allowed_keys)} trusted aggregator keys"
            )
        _verify(self.header, self.signature, key, "aggregator")

    def verify_payload(self, payload: bytes) -> None:
        """Raise EnvelopeError unless `payload` has the signed length and sha256."""
        _verify_payload(self.header, payload)


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedReceipt(_Signed):
    """An aggregator's Receipt with its signature over it."""

    BODY: ClassVar[type[_SignedBody]] = Receipt
    MAX_BYTES: ClassVar[int] = MAX_RECEIPT_ENVELOPE_BYTES

    receipt: Receipt
    signature: bytes  # Ed25519 over receipt.signed_bytes() by receipt.aggregator_public_key

    def verify(self, aggregator_public_key: bytes) -> None:
        """Raise EnvelopeError unless the receipt names and is signed by `aggregator_public_key`."""
        key = self.receipt.aggregator_public_key
        if key != aggregator_public_key:
            raise EnvelopeError(
                f"receipt for round {self.receipt.round} names aggregator {fingerprint(key)}, not the expected one"
            )
        _verify(self.receipt, self.signature, key, "aggregator")


def _sign(body: _SignedBody, identity: Identity, key: bytes, role: str) -> bytes:
    if identity.public_key != key:
        raise EnvelopeError(
            f"cannot sign: the {body.KIND} names {role} {fingerprint(key)}, but this node is {identity.fingerprint}"
        )
    return identity.sign(body.signed_bytes())


def sign_update(header: UpdateHeader, identity: Identity) -> SignedUpdate:
    """Sign a peer's update header; `identity` must hold header.peer_public_key."""
    return SignedUpdate(header=header, signature=_sign(header, identity, header.peer_public_key, "peer"))


def sign_aggregate(header: AggregateHeader, identity: Identity) -> SignedAggregate:
    """Sign an aggregate header; `identity` must hold header.aggregator_public_key."""
    signature = _sign(header, identity, header.aggregator_public_key, "aggregator")
    return SignedAggregate(header=header, signature=signature)


def sign_receipt(receipt: Receipt, identity: Identity) -> SignedReceipt:
    """Sign a receipt; `identity` must hold receipt.aggregator_public_key."""
    signature = _sign(receipt, identity, receipt.aggregator_public_key, "aggregator")
    return SignedReceipt(receipt=receipt, signature=signature)


def sign_state(header: StateHeader, identity: Identity) -> SignedState:
    """Sign a state header; `identity` must hold header.aggregator_public_key."""
    signature = _sign(header, identity, header.aggregator_public_key, "aggregator")
    return SignedState(header=header, signature=signature)
