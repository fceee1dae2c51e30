"""Holder records on the DHT: a peer's signed word that it holds a shard's state at some version."""

from types import SimpleNamespace

import msgpack
import pytest

from potluck.protocol.dht_schema import announcement_subkey
from potluck.protocol.holder_records import (
    HolderRecord,
    HolderRecordError,
    parse_holder_record,
    parse_holder_records,
    sign_holder_record,
)
from potluck.protocol.identity import generate_identity

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

    found = parse_holder_records(SimpleNamespace(value=entries), config_hash=HASH)

    assert [r.holder for r in found] == [HOLDER.public_key]
    assert parse_holder_records(None, config_hash=HASH) == []
