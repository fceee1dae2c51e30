"""Run-wide bans: each aggregator publishes the keys it banned on the DHT, and every other one applies them.

In a sharded run a peer uploads to every shard's aggregator, so a key that one of them caught lying must
be refused by all. Each aggregator keeps one record under BANS_KEY, at the owner-marked subkey of its own
key (dht_schema.Ed25519RecordValidator lets nobody else write it). The value is itself a signed message,
so a reader checks it even on a DHT started without the validator, and it applies a list only when
the signer is one of its run's `aggregator_keys` and the list names its run's config hash. A list from
any other key is skipped quietly and changes nothing: anyone can write one on an open DHT.
"""

import logging
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from potluck.errors import PotluckError
from potluck.protocol.dht_schema import announcement_subkey
from potluck.protocol.identity import PUBLIC_KEY_BYTES, Identity, fingerprint, verify_signature

logger = logging.getLogger(__name__)

BANS_KEY = "potluck/v1/bans"  # one subkey per aggregator, owner-marked like AGGREGATORS_KEY's
MAX_BANS = 1024  # keys one record may list; a run that bans more has a bigger problem than this record
MAX_REASON_CHARS = 200
MAX_RECORD_BYTES = MAX_BANS * (PUBLIC_KEY_BYTES + MAX_REASON_CHARS * 4 + 8) + 1024
_KIND = "potluck/ban-list"
_DOMAIN = b"potluck/ban-list/v1\0"


class BanRecordError(PotluckError):
    """A ban list that is malformed, unsigned, or not from an aggregator of this run (one line)."""


class StrangerBanList(BanRecordError):
    """A ban list whose issuer is not an aggregator of this run: anyone may write one, so it is skipped unread."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BanList:
    """The keys one aggregator banned, as it signed them."""

    issuer: bytes  # the aggregator's key
    config_hash: str
    bans: tuple[tuple[bytes, str], ...]  # (banned key, reason)
    timestamp_s: float


def _body(ban_list: BanList) -> list[Any]:
    bans = [[key, reason] for key, reason in ban_list.bans]
    return [ban_list.issuer, ban_list.config_hash, bans, ban_list.timestamp_s]


def sign_ban_list(ban_list: BanList, identity: Identity) -> tuple[str, bytes]:
    """(subkey, value) to store under BANS_KEY for `ban_list`, signed by `identity` (its issuer)."""
    if identity.public_key != ban_list.issuer:
        raise BanRecordError(
            f"cannot sign a ban list issued by {fingerprint(ban_list.issuer)} as {identity.fingerprint}"
        )
    bans = tuple((key, reason[:MAX_REASON_CHARS]) for key, reason in ban_list.bans[:MAX_BANS])
    capped = BanList(
        issuer=ban_list.issuer, config_hash=ban_list.config_hash, bans=bans, timestamp_s=ban_list.timestamp_s
    )
    body = _body(capped)
    signature = identity.sign(_DOMAIN + msgpack.packb(body, use_bin_type=True, use_single_float=False))
    value = msgpack.packb([_KIND, body, signature], use_bin_type=True, use_single_float=False)
    return announcement_subkey(identity.public_key), value


def parse_ban_list(subkey: Any, data: Any, *, config_hash: str, trusted: frozenset[bytes]) -> BanList:
    """One stored ban list, checked: its shape, its place, its signature, its run and its signer's standing."""
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise BanRecordError("value must be bytes of bounded size")
    try:
        outer = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=MAX_REASON_CHARS * 4,
            max_bin_len=PUBLIC_KEY_BYTES * 2,
            max_array_len=MAX_BANS,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types
        raise BanRecordError(f"value is not valid msgpack ({type(e).__name__})") from e
    if not (isinstance(outer, list) and len(outer) == 3 and outer[0] == _KIND):
        raise BanRecordError("value is not a ban list [kind, body, signature]")
    _, body, signature = outer
    if not (isinstance(body, list) and len(body) == 4 and isinstance(signature, bytes)):
        raise BanRecordError("ban list body must be [issuer, config hash, bans, timestamp]")
    issuer, hashed, bans, timestamp_s = body
    if not isinstance(issuer, bytes) or len(issuer) != PUBLIC_KEY_BYTES:
        raise BanRecordError("ban list issuer must be a raw Ed25519 key")
    if subkey != announcement_subkey(issuer):
        raise BanRecordError(f"ban list of {fingerprint(issuer)} is stored under another subkey")
    if issuer not in trusted:  # before the signature: a stranger's list costs no verification
        raise StrangerBanList(f"ban list from {fingerprint(issuer)}, which is not an aggregator of this run")
    if not verify_signature(
        issuer, signature, _DOMAIN + msgpack.packb(body, use_bin_type=True, use_single_float=False)
    ):
        raise BanRecordError(f"ban list signature does not verify under {fingerprint(issuer)}")
    if hashed != config_hash:
        raise BanRecordError(f"ban list from {fingerprint(issuer)} is for another run config")
    if not (isinstance(bans, list) and isinstance(timestamp_s, float) and math.isfinite(timestamp_s)):
        raise BanRecordError("ban list must hold a list of bans and a finite timestamp")
    parsed = []
    for entry in bans:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise BanRecordError("each ban must be [key, reason]")
        key, reason = entry
        if not (isinstance(key, bytes) and len(key) == PUBLIC_KEY_BYTES and isinstance(reason, str)):
            raise BanRecordError("each ban must name a raw Ed25519 key and a reason")
        parsed.append((key, "".join(ch if ch.isprintable() else "?" for ch in reason)[:MAX_REASON_CHARS]))
    return BanList(issuer=issuer, config_hash=hashed, bans=tuple(parsed), timestamp_s=timestamp_s)


def parse_ban_lists(result: Any, *, config_hash: str, trusted: frozenset[bytes]) -> list[BanList]:
    """The valid ban lists in what `dht.get(BANS_KEY, latest=True)` returned; anything else is skipped."""
    entries = getattr(result, "value", None)
    if not isinstance(entries, dict):
        return []
    lists = []
    for subkey, item in entries.items():
        try:
            lists.append(
                parse_ban_list(subkey, getattr(item, "value", None), config_hash=config_hash, trusted=trusted)
            )
        except StrangerBanList as e:  # the DHT is open: strangers' lists are expected, never news
            logger.debug("ignoring a ban list under subkey %.90r: %s", subkey, e)
        except BanRecordError as e:
            logger.warning("ignoring a ban list under subkey %.90r: %s", subkey, e)
    return lists
