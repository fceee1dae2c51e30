"""Who holds the state: peers that follow the run say so on the DHT, so joiners can fetch chunks from them.

Each peer that serves chunks keeps one record per shard it holds, at the owner-marked subkey of its own
key (dht_schema.Ed25519RecordValidator lets nobody else write it): where to reach it and which version of
each shard it holds. The value is itself a signed message, checked by the reader even on a DHT started
without the validator. A record is only a hint: every chunk is checked against the aggregator's signed
manifest, so a holder that lies wastes one request of a joiner's, never its state.

Where a record goes, so that a lookup does not grow with the run: under the key of its run config, shard
and version, in one of `holder_buckets(n)` buckets, where n is the number of contributors the aggregate
that made that version lists (both the holder and the joiner have that signed aggregate; the holders a
joiner believes are those contributors, holder_trust.py). A holder's bucket is a hash of its key, so about
PER_BUCKET holders share one. A joiner reads READ_BUCKETS random buckets and parses only the subkeys of
keys it believes, at most MAX_PARSED_PER_BUCKET of them a bucket, freshest first: a stranger's subkeys
cost it bytes on the wire (hivemind's message limit caps one answer), never a signature check, and
cannot push a member's record out (hivemind keeps every subkey; a stranger cannot write a member's).
"""

import asyncio
import hashlib
import logging
import math
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from potluck.errors import PotluckError
from potluck.protocol.dht_schema import MAX_MADDR_CHARS, MAX_MADDRS, MAX_PEER_ID_BYTES, announcement_subkey
from potluck.protocol.identity import PUBLIC_KEY_BYTES, Identity, fingerprint, verify_signature

logger = logging.getLogger(__name__)

# v1 kept every holder of the run under one key; v2 keys by config, shard, version and bucket (records unchanged).
HOLDERS_PREFIX = "potluck/v2/state-holders"
MAX_SHARDS = 64  # shards one record may list
MAX_RECORD_BYTES = 4096 + MAX_MADDRS * MAX_MADDR_CHARS * 4
PER_BUCKET = 16  # holders a bucket holds on average: twice MAX_DONORS (peer/sync.py) over READ_BUCKETS buckets
MAX_BUCKETS = 4096  # 65,536 contributors before a bucket grows past PER_BUCKET on average
READ_BUCKETS = 2  # buckets a joiner reads: one bucket's holders may all be gone or busy
MAX_PARSED_PER_BUCKET = 4 * PER_BUCKET  # a bucket's count is binomial: 64 is past any honest one's tail
_KIND = "potluck/state-holder"
_DOMAIN = b"potluck/state-holder/v1\0"
_BUCKET_DOMAIN = b"potluck/holder-bucket/v1\0"


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


def holder_buckets(contributors: int) -> int:
    """How many buckets the holders of a version are spread over, from the contributors its aggregate lists.

    Both sides know the count from the same signed aggregate; 0 (a first state, no aggregate) is one bucket.
    """
    return max(1, min(MAX_BUCKETS, math.ceil(contributors / PER_BUCKET)))


def holder_bucket(holder: bytes, *, shard: int, version: int, buckets: int) -> int:
    """The bucket `holder`'s record of `shard` at `version` goes to: a hash of all three, mod `buckets`."""
    digest = hashlib.sha256(_BUCKET_DOMAIN + holder + shard.to_bytes(8, "big") + version.to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def holders_key(config_hash: str, *, shard: int, version: int, bucket: int) -> str:
    """The DHT key of one bucket of the holders of `shard` at `version` in the run config `config_hash`."""
    return f"{HOLDERS_PREFIX}/{config_hash}/{shard}/{version}/{bucket}"


def parse_holder_records(
    result: Any,
    *,
    config_hash: str,
    trusted: Collection[bytes] | None,
    limit: int = MAX_PARSED_PER_BUCKET,
) -> list[HolderRecord]:
    """The valid records of this run config in what `dht.get(<a holders key>, latest=True)` returned.

    Only subkeys of `trusted` keys are parsed (None: every key, for tools that look at what strangers
    wrote), the freshest `limit` of them: the signature checks a lookup costs are bounded by what the
    reader believes, never by what anyone wrote.
    """
    entries = getattr(result, "value", None)
    if not isinstance(entries, dict):
        return []
    wanted = None if trusted is None else {announcement_subkey(key) for key in trusted}
    candidates = [
        (subkey, item)
        for subkey, item in entries.items()
        if wanted is None or (isinstance(subkey, str) and subkey in wanted)
    ]
    candidates.sort(key=lambda entry: _expiration(entry[1]), reverse=True)
    records = []
    for subkey, item in candidates[:limit]:
        try:
            record = parse_holder_record(subkey, getattr(item, "value", None))
        except HolderRecordError as e:
            logger.debug("ignoring a holder record under subkey %.90r: %s", subkey, e)
            continue
        if record.config_hash == config_hash:
            records.append(record)
    return records


def lookup_keys(
    config_hash: str, *, shard: int, version: int, contributors: int, rng: random.Random | None = None
) -> list[str]:
    """The keys of READ_BUCKETS distinct random buckets (all of them when there are fewer) a joiner reads."""
    buckets = holder_buckets(contributors)
    chosen = (rng or random).sample(range(buckets), min(READ_BUCKETS, buckets))
    return [holders_key(config_hash, shard=shard, version=version, bucket=b) for b in chosen]


async def lookup_holders(
    dht: Any,
    *,
    config_hash: str,
    shard: int,
    version: int,
    contributors: int,
    trusted: Collection[bytes],
    rng: random.Random | None = None,
) -> list[HolderRecord]:
    """The records of `trusted` holders of `shard` at `version`, from READ_BUCKETS random buckets of its key.

    `dht` is a hivemind DHTNode; `contributors` the count the aggregate that made `version` lists. Each
    record is checked (parse_holder_records); whether it names that version is the caller's to check.
    """
    keys = lookup_keys(config_hash, shard=shard, version=version, contributors=contributors, rng=rng)
    found = await dht.get_many(keys, sufficient_expiration_time=float("inf"))
    records: dict[bytes, HolderRecord] = {}
    for key in keys:
        for record in parse_holder_records(found.get(key), config_hash=config_hash, trusted=trusted):
            records[record.holder] = record
    return list(records.values())


async def store_holder_record(
    dht: Any, record: HolderRecord, identity: Identity, *, ttl_s: float, contributors: Mapping[int, int]
) -> bool:
    """Publish `record` on `dht` (a hivemind DHTNode whose validator signs as `identity`) for `ttl_s` seconds.

    It goes to the bucket of each shard it lists; `contributors` maps a shard to the count its version's
    aggregate lists (a shard left out: 0, the bucket of a state no aggregate made). A record is a hint
    for joiners: a store that fails or times out costs nothing but that, so this returns False then
    instead of raising.
    """
    from hivemind.utils import get_dht_time

    subkey, value = sign_holder_record(record, identity)
    keys = [
        holders_key(
            record.config_hash,
            shard=shard,
            version=version,
            bucket=holder_bucket(
                record.holder, shard=shard, version=version, buckets=holder_buckets(contributors.get(shard, 0))
            ),
        )
        for shard, version in record.shards
    ]
    expiration = get_dht_time() + ttl_s
    try:
        stored = await asyncio.wait_for(
            asyncio.gather(*(dht.store(key, value, expiration, subkey=subkey) for key in keys)), timeout=10
        )
    except Exception as e:  # hivemind raises several types when no DHT peer answers
        logger.debug("holder record not stored: %s", e or type(e).__name__)
        return False
    return all(stored)


def _expiration(item: Any) -> float:
    expiration = getattr(item, "expiration_time", None)
    if isinstance(expiration, bool) or not isinstance(expiration, int | float) or not math.isfinite(expiration):
        return -math.inf
    return float(expiration)


def _is_maddr(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= MAX_MADDR_CHARS and value.isprintable()


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(type(v) is int and 0 <= v < 2**63 for v in value)
