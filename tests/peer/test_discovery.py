"""A stranger's aggregator announcement never ends a peer; only the run's own aggregators can ask it to upgrade."""

import logging
from collections.abc import Collection

import pytest

from potluck.peer.discovery import SkipLog, usable_announcements
from potluck.peer.options import PeerError
from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.client import AggregatorUnreachable
from potluck.protocol.dht_schema import AggregatorAnnouncement
from potluck.protocol.identity import Identity, generate_identity, public_key_to_hex

RUN = "tiny-run"
REAL, STANDBY, STRANGER, OTHER_STRANGER = (generate_identity() for _ in range(4))
REAL_PEER_ID = b"\x00\x24" + bytes(36)
NEWER = PROTOCOL_VERSION + 1


def announcement(identity: Identity, **overrides: object) -> AggregatorAnnouncement:
    """A valid announcement of RUN by `identity`, with `overrides` applied."""
    values: dict = {
        "run_id": RUN,
        "config_hash": "ab" * 32,
        "public_key": identity.public_key,
        "libp2p_peer_id": b"\x00\x24" + identity.public_key + bytes(4),
        "maddrs": ("/ip4/127.0.0.1/tcp/4242",),
        "round": 3,
        "timestamp_s": 1_700_000_000.5,
    }
    return AggregatorAnnouncement(**(values | overrides))


def usable(
    found: list[AggregatorAnnouncement],
    *,
    run: str | None = RUN,
    run_keys: Collection[Identity] | None = None,
    joined: Collection[bytes] = (),
    log: SkipLog | None = None,
) -> list[AggregatorAnnouncement]:
    keys = None if run_keys is None else {public_key_to_hex(i.public_key) for i in run_keys}
    return usable_announcements(found, run=run, run_keys=keys, joined=joined, log=log or SkipLog())


REAL_ONE = announcement(REAL, libp2p_peer_id=REAL_PEER_ID)
# Announced after the real one, so that a newest-first choice would pick them
NEWER_VERSION = announcement(STRANGER, protocol_version=NEWER, timestamp_s=1_700_000_100.0)
OTHER_RUN = announcement(OTHER_STRANGER, run_id="other-run", timestamp_s=1_700_000_100.0)


@pytest.mark.parametrize("run", [RUN, None])
def test_strangers_of_another_version_or_run_are_skipped_and_the_real_one_kept(run: str | None) -> None:
    # Execute: without --run, the --join named aggregator picks the run
    found = usable([NEWER_VERSION, REAL_ONE, OTHER_RUN], run=run, joined={REAL_PEER_ID})

    # Assert
    assert found == [REAL_ONE]


def test_only_strangers_announcing_is_no_aggregator_yet_not_an_upgrade_demand() -> None:
    with pytest.raises(AggregatorUnreachable) as error:
        usable([NEWER_VERSION, OTHER_RUN])

    assert not isinstance(error.value, PeerError)
    assert str(error.value).startswith(f"no aggregator announcement of run {RUN!r} on the DHT yet")
    assert "pip install" not in str(error.value)


def test_once_the_config_is_known_a_strangers_newer_version_is_not_even_a_hint() -> None:
    with pytest.raises(AggregatorUnreachable) as error:
        usable([NEWER_VERSION], run_keys={REAL})

    assert str(error.value) == f"no aggregator announcement of run {RUN!r} on the DHT yet"


def test_once_the_config_is_known_only_the_runs_keys_count() -> None:
    stranger_of_this_version = announcement(STRANGER, timestamp_s=1_700_000_100.0)

    assert usable([stranger_of_this_version, REAL_ONE], run_keys={REAL}) == [REAL_ONE]


def test_the_runs_own_aggregator_on_a_newer_protocol_asks_for_an_upgrade_naming_no_install_command() -> None:
    with pytest.raises(PeerError) as error:
        usable([announcement(REAL, protocol_version=NEWER), NEWER_VERSION], run_keys={REAL})

    message = str(error.value)
    assert f"this peer runs potluck protocol v{PROTOCOL_VERSION}" in message
    assert message.endswith(f"speaks v{NEWER}: upgrade potluck from where you installed it")
    assert "pip" not in message


def test_the_runs_newer_aggregator_is_not_fatal_while_another_of_its_aggregators_speaks_this_version() -> None:
    standby = announcement(STANDBY)

    assert usable([announcement(REAL, protocol_version=NEWER), standby], run_keys={REAL, STANDBY}) == [standby]


def test_several_runs_and_no_way_to_choose_is_retried_not_fatal() -> None:
    with pytest.raises(AggregatorUnreachable, match="several runs .*; choose one with --run NAME"):
        usable([REAL_ONE, OTHER_RUN], run=None)


def test_each_skipped_announcement_is_logged_once() -> None:
    # Prepare
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("potluck.peer.discovery")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    log = SkipLog()

    # Execute: a peer looks the aggregators up again and again
    try:
        for _ in range(5):
            usable([NEWER_VERSION, REAL_ONE, OTHER_RUN], log=log)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    # Assert
    assert len(lines) == 2
    assert any(f"protocol v{NEWER}" in line for line in lines)
    assert any("'other-run'" in line for line in lines)
