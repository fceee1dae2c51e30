"""Who holds the state: peers that follow the run say so on the DHT, so joiners can fetch chunks from them.

Each peer that serves chunks keeps one record under HOLDERS_KEY, at the owner-marked subkey of its own
key (dht_schema.Ed25519RecordValidator lets nobody else write it): where to reach it and which version of
each shard it holds. The value is itself a signed message, checked by the reader even on a DHT started
without the validator. A record is only a hint: every chunk is checked against the aggregator's signed
manifest, so a holder that lies wastes one request of a joiner's, never its state.
"""

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from potluck.errors import PotluckError
from potluck.protocol.dht_schema import MAX_MADDR_CHARS, MAX_MADDRS, MAX_PEER_ID_BYTES, announcement_subkey
from potluck.protocol.identity import PUBLIC_KEY_BYTES, Identity, fingerprint, verify_signature

logger = logging.getLogger(__name__)

HOLDERS_KEY = "potluck/v1/state-holders"  # one subkey per holding peer, owner-marked like AGGREGATORS_KEY's
MAX_SHARDS = 64  # shards one record may list
MAX_RECORD_BYTES = 4096 + MAX_MADDRS * MAX_MADDR_CHARS * 4
_KIND = "potluck/state-holder"
_DOMAIN = b"potluck/state-holder/v1\0"


class HolderRecordError(PotluckError):
    """A holder record that is malformed, unsigned or misplaced (one line)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HolderRecord:
    """One peer's statement: reach me at `maddrs`; I hold these (shard, version) states of this run config."""

    holder: bytes  # the peer's Ed25519 key
    libp2p_peer_id: bytes
    maddrs: tuple[str, ...]
    config_hash: str
    shards: tuple[tuple[int, int], ...]  # (shard index, master version of that shard)
    timestamp_s: float

    def version_of(self, shard: int) -> int | None:
        """The version of `shard` this peer holds, None when it lists none."""
        return dict(self.shards).get(shard)


def _body(record: HolderRecord) -> list[Any]:
    return [
        record.holder,
        record.libp2p_peer_id,
        list(record.maddrs),
        record.config_hash,
        [[shard, version] for shard, version in record.shards],
        record.timestamp_s,
    ]


def _signed_bytes(body: list[Any]) -> bytes:
    return _DOMAIN + msgpack.packb(body, use_bin_type=True, use_single_float=False)


def sign_holder_record(record: HolderRecord, identity: Identity) -> tuple[str, bytes]:
    """(subkey, value) to store under HOLDERS_KEY for `record`, signed by `identity` (its holder)."""
    if identity.public_key != record.holder:
        raise HolderRecordError(
            f"cannot sign a holder record of {fingerprint(record.holder)} as {identity.fingerprint}"
        )
    body = _body(record)
    value = msgpack.packb([_KIND, body, identity.sign(_signed_bytes(body))], use_bin_type=True, use_single_float=False)
    if len(value) > MAX_RECORD_BYTES:
        raise HolderRecordError(f"holder record is {len(value)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    return announcement_subkey(identity.public_key), value


def parse_holder_record(subkey: Any, data: Any) -> HolderRecord:
    """One stored holder record, checked: its shape, its bounds, its place and its signature."""
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise HolderRecordError("value must be bytes of bounded size")
    try:
        outer = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=4 * MAX_MADDR_CHARS,
            max_bin_len=max(MAX_PEER_ID_BYTES, 64),
            max_array_len=max(MAX_MADDRS, MAX_SHARDS),
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types
        raise HolderRecordError(f"value is not valid msgpack ({type(e).__name__})") from e
    if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == _KIND and isinstance(outer[2], bytes)):
        raise HolderRecordError("value is not a holder record [kind, body, signature]")
    _, body, signature = outer
    if not (isinstance(body, list) and len(body) == 6):
        raise HolderRecordError("holder record body must be [key, peer id, maddrs, config hash, shards, timestamp]")
    holder, peer_id, maddrs, config_hash, shards, timestamp_s = body
    if not isinstance(holder, bytes) or len(holder) != PUBLIC_KEY_BYTES:
        raise HolderRecordError("holder record's key must be a raw Ed25519 key")
    if subkey != announcement_subkey(holder):
        raise HolderRecordError(f"holder record of {fingerprint(holder)} is stored under another subkey")
    if not verify_signature(holder, signature, _signed_bytes(body)):
        raise HolderRecordError(f"holder record signature does not verify under {fingerprint(holder)}")
    if not (isinstance(peer_id, bytes) and 1 <= len(peer_id) <= MAX_PEER_ID_BYTES):
        raise HolderRecordError("holder record's peer id must be PeerID bytes")
    if not (isinstance(maddrs, list) and all(_is_maddr(m) for m in maddrs) and len(maddrs) <= MAX_MADDRS):
        raise HolderRecordError("holder record's maddrs must be printable multiaddrs")
    if not (isinstance(config_hash, str) and len(config_hash) == 64):
        raise HolderRecordError("holder record's config hash must be 64 hex characters")
    if not (isinstance(shards, list) and len(shards) <= MAX_SHARDS and all(_is_pair(p) for p in shards)):
        raise HolderRecordError("holder record's shards must be [shard, version] pairs of non-negative integers")
    if not (isinstance(timestamp_s, float) and math.isfinite(timestamp_s)):
        raise HolderRecordError("holder record's timestamp must be a finite float")
    return HolderRecord(
        holder=holder,
        libp2p_peer_id=peer_id,
        maddrs=tuple(maddrs),
        config_hash=config_hash,
        shards=tuple((shard, version) for shard, version in shards),
        timestamp_s=timestamp_s,
    )


def parse_holder_records(result: Any, *, config_hash: str) -> list[HolderRecord]:
    """The valid records of this run config in what `dht.get(HOLDERS_KEY, latest=True)` returned."""
    entries = getattr(result, "value", None)
    if not isinstance(entries, dict):
        return []
    records = []
    for subkey, item in entries.items():
        try:
            record = parse_holder_record(subkey, getattr(item, "value", None))
        except HolderRecordError as e:
            logger.debug("ignoring a holder record under subkey %.90r: %s", subkey, e)
            continue
        if record.config_hash == config_hash:
            records.append(record)
    return records


async def store_holder_record(dht: Any, record: HolderRecord, identity: Identity, *, ttl_s: float) -> bool:
    """Publish `record` on `dht` (a hivemind DHTNode whose validator signs as `identity`) for `ttl_s` seconds.

    A record is a hint for joiners: a store that fails or times out costs nothing but that, so this
    returns False then instead of raising.
    """
    from hivemind.utils import get_dht_time

    subkey, value = sign_holder_record(record, identity)
    try:
        return bool(
            await asyncio.wait_for(dht.store(HOLDERS_KEY, value, get_dht_time() + ttl_s, subkey=subkey), timeout=10)
        )
    except Exception as e:  # hivemind raises several types when no DHT peer answers
        logger.debug("holder record not stored: %s", e or type(e).__name__)
        return False


def _is_maddr(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= MAX_MADDR_CHARS and value.isprintable()


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(type(v) is int and 0 <= v < 2**63 for v in value)
