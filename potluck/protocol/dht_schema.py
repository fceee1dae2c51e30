"""What potluck keeps in hivemind's DHT: key names, the aggregator announcement, and a record validator.

Aggregators announce themselves under one DHT key, AGGREGATORS_KEY, one subkey per aggregator. The
subkey names its owner, `[ed25519:<64 hex>]`, and `Ed25519RecordValidator` lets only that key's holder
write or overwrite it: every potluck node passes the validator to `hivemind.DHT(record_validators=...)`,
and a node refuses to store, or to accept from a lookup, any owner-marked record without the owner's
signature. The model is hivemind's RSASignatureValidator (`[owner:...]` subkeys), with Ed25519 keys.

What hivemind hands a validator (hivemind 1.1.12, `dht/node.py` and `dht/protocol.py`): `record.key`
is never the key text but its 20-byte DHTID, sha1(msgpack(key)), so no marker can be seen in a key and
AGGREGATORS_KEY is recognised by its DHTID; `record.subkey` is the subkey serialized with msgpack
(a str subkey arrives as its msgpack str bytes); `record.value` is the msgpack of the stored value.

Record signature: the owner's Ed25519 signature, appended as the value's last 64 bytes, over
`b"potluck/dht-record/v1\\0" + msgpack([key DHTID, subkey bytes, value bytes, float expiration_time])`,
so nobody else can change the value or extend its expiration. The announcement inside the value is
itself a signed message, `[kind, [fields], signature]` as in envelope.py, so `parse_announcements`
verifies it even when the local DHT was started without the validator.
"""

import dataclasses
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

with warnings.catch_warnings():
    # `import hivemind` runs torch.jit.script, which recent torch deprecates with a warning of its own.
    warnings.simplefilter("ignore", DeprecationWarning)
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from potluck.errors import PotluckError
from potluck.protocol import PROTOCOL_VERSION, UPGRADE_HINT
from potluck.protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    fingerprint,
    public_key_to_hex,
    verify_signature,
)

logger = logging.getLogger(__name__)

AGGREGATORS_KEY = "potluck/v1/aggregators"  # one DHT key; one subkey per aggregator (owner = its Ed25519 key)
MAX_MADDRS = 16
MAX_MADDR_CHARS = 256
MAX_RUN_ID_CHARS = 128
MAX_PEER_ID_BYTES = 128  # a libp2p PeerID is a multihash: 34 bytes for RSA keys, 38 for Ed25519 ones
# A real announcement is well under 1 KiB; 16 multiaddrs of 256 characters is the most it can legitimately hold.
MAX_ANNOUNCEMENT_BYTES = 8192
_MAX_ARRAY_LEN = MAX_MADDRS  # the longest msgpack array in an announcement (its 8 fields, its maddrs)
_MAX_INT = 2**63 - 1

_OWNER_MARKER = b"[ed25519:"
_RECORD_DOMAIN = b"potluck/dht-record/v1\0"
_ANNOUNCEMENT_DOMAIN = b"potluck/aggregator-announcement/v1\0"
_ANNOUNCEMENT_KIND = "potluck/aggregator-announcement"
# An owner-marked subkey as hivemind hands it over: msgpack str8 (0xd9, length 74), then the text.
_SUBKEY_RE = re.compile(re.escape(b"\xd9\x4a" + _OWNER_MARKER) + rb"([0-9a-f]{64})\]", re.DOTALL)
_AGGREGATORS_KEY_ID = DHTID.generate(source=AGGREGATORS_KEY).to_bytes()


class DHTSchemaError(PotluckError):
    """An announcement is malformed or cannot be signed by this identity (one-line message)."""


def announcement_subkey(public_key: bytes) -> str:
    """The owner-marked subkey under which `public_key`'s aggregator announces itself: `[ed25519:<64 hex>]`."""
    return f"[ed25519:{public_key_to_hex(public_key)}]"


def _is_text(max_chars: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and 1 <= len(value) <= max_chars and value.isprintable()


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_INT


def _is_maddrs(value: Any) -> bool:
    is_maddr = _is_text(MAX_MADDR_CHARS)
    return isinstance(value, tuple) and len(value) <= MAX_MADDRS and all(is_maddr(m) for m in value)


# One (check, what it must be) per field, in declaration order.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "protocol_version": (lambda v: type(v) is int and 1 <= v <= _MAX_INT, "an integer >= 1"),
    "run_id": (_is_text(MAX_RUN_ID_CHARS), f"printable text of 1 to {MAX_RUN_ID_CHARS} characters"),
    "config_hash": (
        lambda v: isinstance(v, str) and len(v) == 64 and not v.strip("0123456789abcdef"),
        "a sha256 as 64 lowercase hex characters",
    ),
    "public_key": (
        lambda v: isinstance(v, bytes) and len(v) == PUBLIC_KEY_BYTES,
        f"a raw Ed25519 public key ({PUBLIC_KEY_BYTES} bytes)",
    ),
    "libp2p_peer_id": (
        lambda v: isinstance(v, bytes) and 1 <= len(v) <= MAX_PEER_ID_BYTES,
        f"PeerID.to_bytes() (1 to {MAX_PEER_ID_BYTES} bytes)",
    ),
    "maddrs": (_is_maddrs, f"a tuple of at most {MAX_MADDRS} printable multiaddrs of 1 to {MAX_MADDR_CHARS} chars"),
    "round": (_is_count, "an integer in [0, 2^63)"),
    "timestamp_s": (
        lambda v: type(v) is float and math.isfinite(v) and v >= 0,
        "a finite float >= 0 (seconds since the Unix epoch)",
    ),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregatorAnnouncement:
    """What an aggregator publishes under AGGREGATORS_KEY: who it is, where to reach it, which round is open.

    Any protocol_version >= 1 is accepted here so that a reader can name the other side's version; the
    caller skips announcements whose version differs from PROTOCOL_VERSION. Field order is the wire order.
    """

    protocol_version: int = PROTOCOL_VERSION
    run_id: str  # RunConfig.run_name
    config_hash: str  # sha256 hex of the RunConfig: a changed config is a different run
    public_key: bytes  # the aggregator's raw Ed25519 key; must be the subkey's owner
    libp2p_peer_id: bytes  # PeerID.to_bytes() of its P2P node: signing it binds the two identities
    maddrs: tuple[str, ...]  # its visible multiaddrs, for peers to dial
    round: int  # the round it has open
    timestamp_s: float  # its Unix time when announcing; freshness is the reader's call (clocks differ)

    def __post_init__(self) -> None:
        for field in fields(self):
            is_valid, expected = _RULES[field.name]
            value = getattr(self, field.name)
            if not is_valid(value):
                raise DHTSchemaError(f"AggregatorAnnouncement.{field.name} must be {expected}, got {value!r:.60}")

    def _wire_fields(self) -> list[Any]:
        return [list(v) if isinstance(v, tuple) else v for v in (getattr(self, f.name) for f in fields(self))]

    def canonical_bytes(self) -> bytes:
        """The fields, in declaration order, as one msgpack array (maddrs as an array, floats as float64)."""
        return msgpack.packb(self._wire_fields(), use_bin_type=True, use_single_float=False)

    def signed_bytes(self) -> bytes:
        """Exactly what the announcement's signature covers: the domain tag + canonical bytes."""
        return _ANNOUNCEMENT_DOMAIN + self.canonical_bytes()


def sign_announcement(announcement: AggregatorAnnouncement, identity: Identity) -> tuple[str, bytes]:
    """Sign `announcement` with `identity` (which must hold announcement.public_key); return (subkey, value).

    Store them with `dht.store(AGGREGATORS_KEY, value, expiration_time, subkey=subkey)` on a DHT whose
    Ed25519RecordValidator holds the same identity, which adds the record signature.
    """
    if identity.public_key != announcement.public_key:
        raise DHTSchemaError(
            f"cannot sign: the announcement names aggregator {fingerprint(announcement.public_key)}, "
            f"but this node is {identity.fingerprint}; build it with public_key=identity.public_key"
        )
    signature = identity.sign(announcement.signed_bytes())
    wire = [_ANNOUNCEMENT_KIND, announcement._wire_fields(), signature]
    value = msgpack.packb(wire, use_bin_type=True, use_single_float=False)
    return announcement_subkey(announcement.public_key), value


def _decode_announcement(subkey: Any, data: Any) -> AggregatorAnnouncement:
    """Parse and verify one announcement's value bytes found under `subkey`; any problem is a DHTSchemaError."""
    if not isinstance(data, bytes) or len(data) > MAX_ANNOUNCEMENT_BYTES:
        raise DHTSchemaError(f"value must be at most {MAX_ANNOUNCEMENT_BYTES} bytes, got {type(data).__name__}")
    try:
        outer = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=4 * MAX_MADDR_CHARS,  # UTF-8 takes at most 4 bytes a character
            max_bin_len=MAX_ANNOUNCEMENT_BYTES,
            max_array_len=_MAX_ARRAY_LEN,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types (ValueError, StackError, UnicodeDecodeError, ...)
        raise DHTSchemaError(f"value is not valid msgpack ({type(e).__name__})") from e
    if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == _ANNOUNCEMENT_KIND):
        raise DHTSchemaError("value is not an aggregator announcement [kind, [fields], signature]")
    _, values, signature = outer
    names = [f.name for f in fields(AggregatorAnnouncement)]
    if not isinstance(values, list) or len(values) != len(names):
        version = values[0] if isinstance(values, list) and values and type(values[0]) is int else "?"
        raise DHTSchemaError(
            f"announcement has a field list unlike protocol v{PROTOCOL_VERSION}'s (it claims v{version}); "
            f"if its version is newer, {UPGRADE_HINT}"
        )
    as_fields = dict(zip(names, values, strict=True))
    if isinstance(as_fields["maddrs"], list):
        as_fields["maddrs"] = tuple(as_fields["maddrs"])
    try:
        announcement = AggregatorAnnouncement(**as_fields)
    except DHTSchemaError as e:
        if type(values[0]) is int and values[0] != PROTOCOL_VERSION:  # v2 may change any field's meaning
            raise DHTSchemaError(
                f"announcement speaks protocol v{values[0]}, this node speaks v{PROTOCOL_VERSION} ({e})"
            ) from e
        raise
    if subkey != announcement_subkey(announcement.public_key):
        raise DHTSchemaError(f"announcement of {fingerprint(announcement.public_key)} is stored under another subkey")
    if not verify_signature(announcement.public_key, signature, announcement.signed_bytes()):
        raise DHTSchemaError(f"announcement signature does not verify under {fingerprint(announcement.public_key)}")
    return announcement


def parse_announcements(result: Any) -> list[AggregatorAnnouncement]:
    """The valid, verified announcements in what `dht.get(AGGREGATORS_KEY, latest=True)` returned.

    `result` is None or a ValueWithExpiration whose .value maps subkey -> ValueWithExpiration(bytes).
    Malformed, unsigned or misplaced entries are skipped with a warning. Announcements of another
    protocol_version are returned as long as their fields parse: the caller must compare
    protocol_version with PROTOCOL_VERSION and skip them, naming both; anyone can sign one, so only the
    run's own aggregator keys may make it end a node.
    """
    if result is None:
        return []
    entries = getattr(result, "value", None)
    if not isinstance(entries, dict):
        logger.warning(
            "ignoring %s: expected a dictionary of subkeys, got %s", AGGREGATORS_KEY, type(entries).__name__
        )
        return []
    announcements = []
    for subkey, item in entries.items():
        try:
            announcements.append(_decode_announcement(subkey, getattr(item, "value", None)))
        except DHTSchemaError as e:
            logger.warning("ignoring announcement under subkey %.90r: %s", subkey, e)
    return announcements


def _record_owner(record: DHTRecord) -> bytes | None:
    """The Ed25519 key that must sign `record`, b"" for a record no one may write, None for an unprotected one."""
    if _OWNER_MARKER in record.key:
        return b""  # hivemind hashes keys, so a marker here never comes from an honest node
    if _OWNER_MARKER in record.subkey:
        match = _SUBKEY_RE.fullmatch(record.subkey)
        return bytes.fromhex(match[1].decode("ascii")) if match else b""
    if record.key == _AGGREGATORS_KEY_ID:
        return b""  # every announcement sits under its owner's subkey
    return None


def _record_signed_bytes(record: DHTRecord) -> bytes:
    # float(): a local store may pass an int expiration, which reaches other nodes as a protobuf double.
    body = [record.key, record.subkey, record.value, float(record.expiration_time)]
    return _RECORD_DOMAIN + msgpack.packb(body, use_bin_type=True, use_single_float=False)


class Ed25519RecordValidator(RecordValidatorBase):
    """Only the holder of an Ed25519 key may write records whose subkey is marked `[ed25519:<its hex>]`.

    Pass one to `hivemind.DHT(record_validators=[...])` on every potluck node: with `identity` on a node
    that stores its own records (an aggregator), without on a node that only reads. Records under
    AGGREGATORS_KEY without an owner-marked subkey are refused; records of other keys without a marker
    (hivemind's own among them) pass untouched. Pass it at construction, not with `dht.add_validators`:
    the DHT process is forked with it, and an Ed25519 private key cannot be pickled through a pipe.
    """

    # Outermost: signs last and validates first, above hivemind's RSASignatureValidator (10) and schema
    # validators (0), so that the 64-byte signature is always the value's tail when we look at it.
    PRIORITY: ClassVar[int] = 20

    def __init__(self, identity: Identity | None = None) -> None:
        self._identity = identity

    @property
    def priority(self) -> int:
        return self.PRIORITY

    def validate(self, record: DHTRecord) -> bool:
        """True for an unprotected record or one signed by its owner; False for anything else, never raises."""
        try:
            if not all(isinstance(part, bytes) for part in (record.key, record.subkey, record.value)):
                return False
            owner = _record_owner(record)
            if owner is None:
                return True
            if not owner or len(record.value) <= SIGNATURE_BYTES:
                return False
            unsigned = dataclasses.replace(record, value=record.value[:-SIGNATURE_BYTES])
            return verify_signature(owner, record.value[-SIGNATURE_BYTES:], _record_signed_bytes(unsigned))
        except Exception:  # hostile input must never raise into hivemind's RPC handlers
            logger.debug("refusing a DHT record that could not be checked", exc_info=True)
            return False

    def sign_value(self, record: DHTRecord) -> bytes:
        """Append this node's signature to records it owns; other records are left as they are."""
        owner = _record_owner(record)
        if not owner:
            return record.value
        if self._identity is None or owner != self._identity.public_key:
            mine = "has no identity" if self._identity is None else f"is {self._identity.fingerprint}"
            logger.warning(
                "storing a DHT record owned by %s unsigned (this node %s); other nodes will refuse it",
                fingerprint(owner),
                mine,
            )
            return record.value
        return record.value + self._identity.sign(_record_signed_bytes(record))

    def strip_value(self, record: DHTRecord) -> bytes:
        """Remove the signature from an owner-marked record (called by hivemind only after validate())."""
        if _record_owner(record) and len(record.value) > SIGNATURE_BYTES:
            return record.value[:-SIGNATURE_BYTES]
        return record.value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Absorb another Ed25519RecordValidator: applied twice, each would strip the other's signature."""
        if not isinstance(other, Ed25519RecordValidator):
            return False
        if other._identity is not None:
            if self._identity is not None and self._identity.public_key != other._identity.public_key:
                raise DHTSchemaError(
                    f"two Ed25519RecordValidators with different identities ({self._identity.fingerprint}, "
                    f"{other._identity.fingerprint}); a DHT node signs as one identity, pass only one"
                )
            self._identity = other._identity
        return True
