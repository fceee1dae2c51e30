"""Holder records on the DHT: a peer's signed word that it holds a shard's state at some version."""

import asyncio
import random
from collections import Counter
from types import SimpleNamespace

import msgpack
import pytest

from potluck.lab.attackers.dht_records import ManyKeysValidator
from potluck.protocol import holder_records
from potluck.protocol.dht_schema import announcement_subkey
from potluck.protocol.holder_records import (
    HOLDERS_PREFIX,
    MAX_BUCKETS,
    MAX_PARSED_PER_BUCKET,
    PER_BUCKET,
    READ_BUCKETS,
    HolderRecord,
    HolderRecordError,
    holder_bucket,
    holder_buckets,
    holders_key,
    lookup_holders,
    lookup_keys,
    parse_holder_record,
    parse_holder_records,
    sign_holder_record,
    store_holder_record,
)
from potluck.protocol.identity import generate_identity
from potluck.protocol.node import start_node

HOLDER = generate_identity()
HASH = "cd" * 32


def _record(**changes: object) -> HolderRecord:
    fields: dict[str, object] = dict(
        holder=HOLDER.public_key,
        libp2p_peer_id=b"\x00\x24" + b"p" * 36,
        maddrs=("/ip4/127.0.0.1/tcp/4001",),
        config_hash=HASH,
        shards=((0, 7), (1, 7)),
        timestamp_s=1.0,
    )
    return HolderRecord(**(fields | changes))  # type: ignore[arg-type]


def test_a_signed_record_reads_back_and_names_the_version_of_each_shard() -> None:
    subkey, value = sign_holder_record(_record(), HOLDER)

    found = parse_holder_record(subkey, value)

    assert subkey == announcement_subkey(HOLDER.public_key)
    assert found == _record()
    assert (found.version_of(1), found.version_of(2)) == (7, None)


def test_a_record_under_another_subkey_with_a_flipped_byte_or_of_garbage_is_refused() -> None:
    subkey, value = sign_holder_record(_record(), HOLDER)
    flipped = value[:-70] + bytes([value[-70] ^ 1]) + value[-69:]
    wrong_shards = msgpack.packb(
        ["potluck/state-holder", [HOLDER.public_key, b"p", [], HASH, [[0, -1]], 1.0], b"s" * 64], use_bin_type=True
    )

    with pytest.raises(HolderRecordError, match="stored under another subkey"):
        parse_holder_record(announcement_subkey(generate_identity().public_key), value)
    with pytest.raises(HolderRecordError):
        parse_holder_record(subkey, flipped)
    with pytest.raises(HolderRecordError, match="not valid msgpack"):
        parse_holder_record(subkey, b"\xc1")
    with pytest.raises(HolderRecordError, match="bounded size"):
        parse_holder_record(subkey, b"x" * 100_000)
    with pytest.raises(HolderRecordError, match="signature does not verify"):
        parse_holder_record(subkey, wrong_shards)


def test_only_someone_holding_the_key_can_sign_its_record() -> None:
    with pytest.raises(HolderRecordError, match="cannot sign"):
        sign_holder_record(_record(), generate_identity())


def test_a_lookup_keeps_the_valid_records_of_this_run_and_skips_the_rest() -> None:
    other = generate_identity()
    mine = sign_holder_record(_record(), HOLDER)
    another_run = sign_holder_record(_record(holder=other.public_key, config_hash="ef" * 32), other)
    entries = {
        mine[0]: SimpleNamespace(value=mine[1]),
        another_run[0]: SimpleNamespace(value=another_run[1]),
        "[ed25519:" + "00" * 32 + "]": SimpleNamespace(value=b"garbage"),
    }

    found = parse_holder_records(SimpleNamespace(value=entries), config_hash=HASH, trusted=None)

    assert [r.holder for r in found] == [HOLDER.public_key]
    assert parse_holder_records(None, config_hash=HASH, trusted=None) == []


class _DHT:
    """A DHT as store_holder_record and lookup_holders use it: subkeys under keys, and the keys each get read."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, SimpleNamespace]] = {}
        self.read: list[str] = []

    async def store(self, key: str, value: bytes, expiration_time: float, *, subkey: str) -> bool:
        self.values.setdefault(key, {})[subkey] = SimpleNamespace(value=value, expiration_time=expiration_time)
        return True

    async def get_many(self, keys: list[str], *, sufficient_expiration_time: float) -> dict[str, object]:
        self.read += keys
        return {k: SimpleNamespace(value=dict(self.values[k])) if k in self.values else None for k in keys}


def _store(dht: _DHT, identity: object, *, contributors: int, version: int = 7) -> None:
    record = _record(holder=identity.public_key, shards=((0, version),))  # type: ignore[attr-defined]
    stored = asyncio.run(store_holder_record(dht, record, identity, ttl_s=60, contributors={0: contributors}))  # type: ignore[arg-type]
    assert stored


def _lookup(dht: _DHT, *, contributors: int, trusted: object, seed: int = 0) -> list[HolderRecord]:
    return asyncio.run(
        lookup_holders(
            dht,
            config_hash=HASH,
            shard=0,
            version=7,
            contributors=contributors,
            trusted=trusted,  # type: ignore[arg-type]
            rng=random.Random(seed),
        )
    )


def test_the_bucket_count_follows_the_rounds_contributors_so_a_bucket_holds_about_the_same_at_any_size() -> None:
    assert [holder_buckets(n) for n in (0, 1, PER_BUCKET, PER_BUCKET + 1, 1000)] == [1, 1, 1, 2, 63]
    assert holder_buckets(10**9) == MAX_BUCKETS
    # a holder's bucket is a hash of its key, shard and version: stable, and spread evenly
    keys = [generate_identity().public_key for _ in range(1000)]
    counts = Counter(holder_bucket(k, shard=0, version=7, buckets=holder_buckets(1000)) for k in keys)
    assert holder_bucket(keys[0], shard=0, version=7, buckets=63) == holder_bucket(
        keys[0], shard=0, version=7, buckets=63
    )
    assert len(counts) == 63 and max(counts.values()) < MAX_PARSED_PER_BUCKET


def test_a_holder_of_two_shards_is_found_under_each_shards_key_and_a_lookup_reads_a_few_buckets() -> None:
    # Prepare: 1,000 holders of a run's version; one also holds shard 1
    dht, holders = _DHT(), [generate_identity() for _ in range(1000)]
    for identity in holders:
        _store(dht, identity, contributors=1000)
    both = generate_identity()
    asyncio.run(
        store_holder_record(
            dht, _record(holder=both.public_key, shards=((0, 7), (1, 3))), both, ttl_s=60, contributors={0: 1000, 1: 5}
        )
    )

    # Execute
    found = _lookup(dht, contributors=1000, trusted={h.public_key for h in holders})

    # Assert: two of 63 buckets read, about 2 x 16 records, every one a trusted holder of that version
    assert len(dht.read) == READ_BUCKETS and all(k.startswith(f"{HOLDERS_PREFIX}/{HASH}/0/7/") for k in dht.read)
    assert 0 < len(found) <= READ_BUCKETS * MAX_PARSED_PER_BUCKET
    assert {r.holder for r in found} <= {h.public_key for h in holders}
    assert max(len(subkeys) for subkeys in dht.values.values()) < MAX_PARSED_PER_BUCKET
    assert announcement_subkey(both.public_key) in dht.values[holders_key(HASH, shard=1, version=3, bucket=0)]


def test_a_small_run_has_one_bucket_and_every_holder_is_found() -> None:
    dht, holders = _DHT(), [generate_identity() for _ in range(5)]
    for identity in holders:
        _store(dht, identity, contributors=5)

    found = _lookup(dht, contributors=5, trusted={h.public_key for h in holders})

    assert dht.read == [holders_key(HASH, shard=0, version=7, bucket=0)]
    assert {r.holder for r in found} == {h.public_key for h in holders}


def test_a_strangers_flood_is_never_parsed_and_crowds_no_member_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a member's record, and 2,000 stranger subkeys in the same (only) bucket, fresher than it
    dht, member = _DHT(), generate_identity()
    _store(dht, member, contributors=1)
    (key,) = dht.values
    for i in range(2000):
        subkey = announcement_subkey(i.to_bytes(32, "big"))
        dht.values[key][subkey] = SimpleNamespace(value=b"x" * 300, expiration_time=10.0**12)
    checked: list[object] = []
    real_parse = holder_records.parse_holder_record
    monkeypatch.setattr(holder_records, "parse_holder_record", lambda s, d: checked.append(s) or real_parse(s, d))

    # Execute
    found = _lookup(dht, contributors=1, trusted={member.public_key})

    # Assert: one record checked, the member's
    assert [r.holder for r in found] == [member.public_key]
    assert checked == [announcement_subkey(member.public_key)]


def test_a_reader_checks_at_most_a_buckets_cap_of_member_records_freshest_first() -> None:
    members = [generate_identity() for _ in range(5)]
    entries = {}
    for age, identity in enumerate(members):
        subkey, value = sign_holder_record(_record(holder=identity.public_key), identity)
        entries[subkey] = SimpleNamespace(value=value, expiration_time=1000.0 - age)

    found = parse_holder_records(
        SimpleNamespace(value=entries), config_hash=HASH, trusted={m.public_key for m in members}, limit=2
    )

    assert [r.holder for r in found] == [m.public_key for m in members[:2]]


@pytest.mark.network
@pytest.mark.timeout(90)
def test_a_lookup_over_real_dht_nodes_finds_the_trusted_holders_of_the_buckets_it_reads() -> None:
    # Prepare: one node stores the records of 40 holders (three buckets) and a stranger's, another reads
    holders, stranger = [generate_identity() for _ in range(40)], generate_identity()
    trusted = {h.public_key for h in holders}
    buckets = holder_buckets(len(holders))
    keys = lookup_keys(HASH, shard=0, version=7, contributors=len(holders), rng=random.Random(1))
    read = {int(key.rsplit("/", 1)[1]) for key in keys}

    async def scenario() -> list[HolderRecord]:
        storing = await start_node()
        reader = None
        try:
            storing.dht.protocol.record_validator = ManyKeysValidator([*holders, stranger])
            stores = [
                store_holder_record(
                    storing.dht, _record(holder=i.public_key, shards=((0, 7),)), i, ttl_s=60, contributors={0: 40}
                )
                for i in [*holders, stranger]
            ]
            assert all(await asyncio.gather(*stores))
            reader = await start_node(initial_peers=[str(m) for m in await storing.p2p.get_visible_maddrs()])
            found = await lookup_holders(
                reader.dht,
                config_hash=HASH,
                shard=0,
                version=7,
                contributors=40,
                trusted=trusted,
                rng=random.Random(1),
            )
            return found
        finally:
            for node in (reader, storing):
                if node is not None:
                    await node.shutdown()

    # Execute
    found = asyncio.run(scenario())

    # Assert: exactly the trusted holders whose bucket was read, each once
    expected = {
        h.public_key for h in holders if holder_bucket(h.public_key, shard=0, version=7, buckets=buckets) in read
    }
    assert buckets == 3 and len(keys) == READ_BUCKETS
    assert sorted(r.holder for r in found) == sorted(expected) and expected
