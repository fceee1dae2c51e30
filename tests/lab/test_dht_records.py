"""The red team's stranger records are well-formed and signed (so only the trust decisions keep them out)."""

from types import SimpleNamespace

from potluck.lab.attackers.dht_records import stranger_records
from potluck.peer.discovery import SkipLog, usable_announcements
from potluck.protocol.ban_records import BANS_KEY, parse_ban_lists
from potluck.protocol.dht_schema import AGGREGATORS_KEY, parse_announcements
from potluck.protocol.identity import generate_identity, public_key_to_hex
from tests.peer.test_discovery import announcement

REAL, HONEST = generate_identity(), generate_identity()
STRANGERS = [generate_identity() for _ in range(4)]


def _found(records: list, key: str) -> SimpleNamespace:
    return SimpleNamespace(value={r.subkey: SimpleNamespace(value=r.value) for r in records if r.key == key})


def test_every_stranger_record_parses_and_none_reaches_a_peer_that_trusts_the_run() -> None:
    # Prepare
    real = announcement(REAL)
    records = stranger_records(STRANGERS, real=real, banned=[HONEST.public_key], maddrs=["/ip4/127.0.0.1/tcp/1"])

    # Execute
    announced = parse_announcements(_found(records, AGGREGATORS_KEY))
    trusted_keys = frozenset({REAL.public_key})
    as_its_own = frozenset({STRANGERS[0].public_key})  # a reader that trusted the stranger would take its list
    bans_for_anyone = parse_ban_lists(_found(records, BANS_KEY), config_hash=real.config_hash, trusted=as_its_own)

    # Assert: four signed announcements and a ban list of the honest key that a trusting reader would take
    assert len(announced) == 4 and {a.public_key for a in announced} == {s.public_key for s in STRANGERS}
    assert [key for key, _ in bans_for_anyone[0].bans] == [HONEST.public_key]
    run_keys = {public_key_to_hex(k) for k in trusted_keys}
    usable = usable_announcements([*announced, real], run=real.run_id, run_keys=run_keys, joined=(), log=SkipLog())
    assert usable == [real]
    assert parse_ban_lists(_found(records, BANS_KEY), config_hash=real.config_hash, trusted=trusted_keys) == []
