"""Strikes and bans: who gets banned, what does not count, and that the record survives on disk."""

import json
from pathlib import Path

import pytest

from potluck.aggregator_server.reputation import BANS_FILE, BanFileError, Reputation
from potluck.protocol.identity import generate_identity

KEY = generate_identity().public_key
OTHER = generate_identity().public_key


def test_three_strikes_within_the_window_ban_the_key(tmp_path: Path) -> None:
    reputation = Reputation.open(tmp_path, ban_after=3, window_rounds=10)

    results = [reputation.strike(KEY, round_index=r, check="norm") for r in (1, 4, 9)]

    assert results[:2] == [None, None]
    assert results[2] is not None and "3 rejected updates within 10 rounds (last: norm)" in results[2].reason
    assert reputation.is_banned(KEY) and not reputation.is_banned(OTHER)


def test_strikes_outside_the_window_are_forgotten(tmp_path: Path) -> None:
    reputation = Reputation.open(tmp_path, ban_after=3, window_rounds=10)

    for r in (1, 12, 23, 34):
        reputation.strike(KEY, round_index=r, check="decode")

    assert not reputation.is_banned(KEY)
    assert reputation.strikes[KEY] == [34]


@pytest.mark.parametrize("check", ["signature", "round", "stale", "freshness", "version", "finished", "banned"])
def test_failures_an_honest_or_impersonated_peer_can_cause_are_not_strikes(tmp_path: Path, check: str) -> None:
    reputation = Reputation.open(tmp_path, ban_after=1)

    assert reputation.strike(KEY, round_index=0, check=check) is None
    assert not reputation.is_banned(KEY) and KEY not in reputation.strikes


def test_bans_survive_a_restart_and_an_operator_can_lift_them(tmp_path: Path) -> None:
    first = Reputation.open(tmp_path, ban_after=1)
    first.strike(KEY, round_index=3, check="direction")
    first.ban(OTHER, reason="spam")

    second = Reputation.open(tmp_path)

    assert second.is_banned(KEY) and second.is_banned(OTHER)
    assert second.bans[KEY].round == 3 and second.bans[OTHER].round == -1
    assert second.lift(KEY) and not second.lift(KEY)
    assert not Reputation.open(tmp_path).is_banned(KEY)


def test_a_ban_learned_from_another_aggregator_keeps_its_issuer_across_a_restart(tmp_path: Path) -> None:
    issuer = generate_identity().public_key
    first = Reputation.open(tmp_path)
    first.ban(KEY, reason="whatever the issuer's words", issuer=issuer)
    first.ban(OTHER, reason="run-wide, by hand")  # the words of a learned ban do not make it one

    second = Reputation.open(tmp_path)

    assert second.bans[KEY].issuer == issuer
    assert second.bans[OTHER].issuer is None


def test_a_ban_file_written_before_issuers_reads_as_this_aggregators_own(tmp_path: Path) -> None:
    Reputation.open(tmp_path).ban(KEY, reason="spam")
    data = json.loads((tmp_path / BANS_FILE).read_text())
    for ban in data["bans"].values():
        del ban["issuer"]
    (tmp_path / BANS_FILE).write_text(json.dumps(data))

    assert Reputation.open(tmp_path).bans[KEY].issuer is None


def test_an_edit_on_disk_reaches_a_running_aggregator(tmp_path: Path) -> None:
    running = Reputation.open(tmp_path)
    Reputation.open(tmp_path).ban(KEY, reason="by hand")  # what `potluck bans add` does

    running.reload_if_changed()

    assert running.is_banned(KEY)


@pytest.mark.parametrize("content", ["not json", "{}", json.dumps({"format": "potluck-bans/v1", "bans": {"zz": {}}})])
def test_a_damaged_ban_list_is_one_line_naming_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / BANS_FILE).write_text(content)

    with pytest.raises(BanFileError) as error:
        Reputation.open(tmp_path)

    assert str(tmp_path / BANS_FILE) in str(error.value) and "\n" not in str(error.value)
