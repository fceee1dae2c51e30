"""Run-wide ban lists on the DHT: an aggregator's own signed list, applied only by its run's aggregators."""

from types import SimpleNamespace

import pytest

from potluck.protocol.ban_records import (
    MAX_BANS,
    BanList,
    BanRecordError,
    parse_ban_list,
    parse_ban_lists,
    sign_ban_list,
)
from potluck.protocol.dht_schema import announcement_subkey
from potluck.protocol.identity import generate_identity

ISSUER = generate_identity()
HASH = "ab" * 32
BANNED = [generate_identity().public_key for _ in range(3)]


def _signed(**changes: object) -> tuple[str, bytes]:
    fields = dict(issuer=ISSUER.public_key, config_hash=HASH, bans=tuple((k, "3 rejected updates") for k in BANNED))
    fields |= changes
    return sign_ban_list(BanList(timestamp_s=1.0, **fields), ISSUER)  # type: ignore[arg-type]


def test_a_signed_list_reads_back_for_the_runs_aggregators() -> None:
    subkey, value = _signed()

    found = parse_ban_list(subkey, value, config_hash=HASH, trusted=frozenset({ISSUER.public_key}))

    assert subkey == announcement_subkey(ISSUER.public_key)
    assert [key for key, _ in found.bans] == BANNED and found.issuer == ISSUER.public_key


@pytest.mark.parametrize(
    ("problem", "match"),
    [
        ("untrusted", "not an aggregator of this run"),
        ("other run", "another run config"),
        ("moved", "under another subkey"),
        ("tampered", "does not verify|not valid msgpack"),
        ("garbage", "not valid msgpack|not a ban list"),
    ],
)
def test_a_list_that_is_not_this_runs_aggregators_own_is_refused(problem: str, match: str) -> None:
    subkey, value = _signed()
    trusted, config_hash = frozenset({ISSUER.public_key}), HASH
    if problem == "untrusted":
        trusted = frozenset({generate_identity().public_key})
    elif problem == "other run":
        config_hash = "cd" * 32
    elif problem == "moved":
        subkey = announcement_subkey(generate_identity().public_key)
    elif problem == "tampered":
        value = value[:-70] + bytes([value[-70] ^ 1]) + value[-69:]
    else:
        value = b"\xc1" * 40

    with pytest.raises(BanRecordError, match=match):
        parse_ban_list(subkey, value, config_hash=config_hash, trusted=trusted)


def test_signing_caps_the_list_and_the_reasons() -> None:
    many = tuple((generate_identity().public_key, "x" * 1000) for _ in range(MAX_BANS + 5))
    subkey, value = _signed(bans=many)

    found = parse_ban_list(subkey, value, config_hash=HASH, trusted=frozenset({ISSUER.public_key}))

    assert len(found.bans) == MAX_BANS and all(len(reason) == 200 for _, reason in found.bans)


def test_the_dht_reader_skips_bad_entries_and_keeps_good_ones() -> None:
    subkey, value = _signed()
    result = SimpleNamespace(value={subkey: SimpleNamespace(value=value), "junk": SimpleNamespace(value=b"\x00")})

    lists = parse_ban_lists(result, config_hash=HASH, trusted=frozenset({ISSUER.public_key}))

    assert [b.issuer for b in lists] == [ISSUER.public_key]
    assert parse_ban_lists(None, config_hash=HASH, trusted=frozenset()) == []
