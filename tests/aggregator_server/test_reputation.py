"""Strikes and bans: who gets banned, what does not count, and that the record survives on disk."""

import json
import sqlite3
from pathlib import Path

import pytest

from potluck.aggregator_server.reputation import BANS_FILE, LEGACY_BANS_FILE, BanFileError, Reputation
from potluck.protocol.identity import generate_identity, public_key_to_hex

KEY = generate_identity().public_key
OTHER = generate_identity().public_key


def _reopened(reputation: Reputation, **kwargs: int) -> Reputation:
    """What a restart reads back: `reputation` closed (its writes on disk), the state dir opened again."""
    reputation.close()
    return Reputation.open(reputation.path.parent, **kwargs)


def _strike_rows(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / BANS_FILE) as db:
        return int(db.execute("SELECT count(*) FROM strikes").fetchone()[0])


def test_three_strikes_within_the_window_ban_the_key(tmp_path: Path) -> None:
    reputation = Reputation.open(tmp_path, ban_after=3, window_rounds=10)

    results = [reputation.strike(KEY, round_index=r, check="norm") for r in (1, 4, 9)]

    assert results[:2] == [None, None]
    assert results[2] is not None and "3 rejected updates within 10 rounds (last: norm)" in results[2].reason
    assert reputation.is_banned(KEY) and not reputation.is_banned(OTHER)
    reputation.close()


def test_strikes_outside_the_window_are_forgotten_in_memory_and_on_disk(tmp_path: Path) -> None:
    reputation = Reputation.open(tmp_path, ban_after=3, window_rounds=10)

    for r in (1, 12, 23, 34):
        reputation.strike(KEY, round_index=r, check="decode")
    reputation.strike(OTHER, round_index=20, check="decode")
    reputation.flush()

    assert not reputation.is_banned(KEY)
    assert reputation.strikes == {KEY: [34], OTHER: [20]}
    assert _strike_rows(tmp_path) == 2  # the store keeps what still counts, not every strike ever
    assert _reopened(reputation).strikes == {KEY: [34], OTHER: [20]}


@pytest.mark.parametrize("check", ["signature", "round", "stale", "freshness", "version", "finished", "banned"])
def test_failures_an_honest_or_impersonated_peer_can_cause_are_not_strikes(tmp_path: Path, check: str) -> None:
    reputation = Reputation.open(tmp_path, ban_after=1)

    assert reputation.strike(KEY, round_index=0, check=check) is None
    assert not reputation.is_banned(KEY) and KEY not in reputation.strikes
    reputation.close()


def test_bans_survive_a_restart_and_an_operator_can_lift_them(tmp_path: Path) -> None:
    first = Reputation.open(tmp_path, ban_after=1)
    first.strike(KEY, round_index=3, check="direction")
    first.ban(OTHER, reason="spam")

    second = _reopened(first)

    assert second.is_banned(KEY) and second.is_banned(OTHER)
    assert second.bans[KEY].round == 3 and second.bans[OTHER].round == -1
    assert second.lift(KEY) and not second.lift(KEY)
    assert not _reopened(second).is_banned(KEY)


def test_a_ban_learned_from_another_aggregator_keeps_its_issuer_across_a_restart(tmp_path: Path) -> None:
    issuer = generate_identity().public_key
    first = Reputation.open(tmp_path)
    first.ban(KEY, reason="whatever the issuer's words", issuer=issuer)
    first.ban(OTHER, reason="run-wide, by hand")  # the words of a learned ban do not make it one

    second = _reopened(first)

    assert second.bans[KEY].issuer == issuer
    assert second.bans[OTHER].issuer is None
    second.close()


def test_an_operators_change_reaches_a_running_aggregator(tmp_path: Path) -> None:
    running = Reputation.open(tmp_path)
    running.strike(OTHER, round_index=0, check="norm")
    operator = Reputation.open(tmp_path)  # what `potluck bans add` does, in another process
    operator.ban(KEY, reason="by hand")
    operator.close()

    running.flush()
    running.reload_if_changed()

    assert running.is_banned(KEY) and running.strikes == {OTHER: [0]}
    running.close()


def _legacy_file(state_dir: Path, *, strikes: int) -> None:
    bans = {
        public_key_to_hex(KEY): {"fingerprint": "x", "reason": "spam", "round": 4, "at_s": 1.0, "issuer": None},
        public_key_to_hex(OTHER): {"reason": "learned", "round": -1, "at_s": 2.0},  # written before issuers
    }
    flood = {public_key_to_hex(generate_identity().public_key): [1] for _ in range(strikes)}
    data = {"format": "potluck-bans/v1", "bans": bans, "strikes": flood}
    (state_dir / LEGACY_BANS_FILE).write_text(json.dumps(data))


def test_an_old_state_dirs_bans_json_is_imported_once_and_set_aside(tmp_path: Path) -> None:
    _legacy_file(tmp_path, strikes=50)

    reputation = Reputation.open(tmp_path)
    reputation.lift(KEY)
    again = _reopened(reputation)  # the file set aside is not read again: the lift holds

    assert set(again.bans) == {OTHER} and again.bans[OTHER].issuer is None and again.bans[OTHER].reason == "learned"
    assert again.strikes == {}  # a flood's strikes are left behind
    assert not (tmp_path / LEGACY_BANS_FILE).exists() and (tmp_path / f"{LEGACY_BANS_FILE}.imported").is_file()
    again.close()


@pytest.mark.parametrize("content", ["not json", "{}", json.dumps({"format": "potluck-bans/v1", "bans": {"zz": {}}})])
def test_a_damaged_legacy_ban_list_is_one_line_naming_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / LEGACY_BANS_FILE).write_text(content)

    with pytest.raises(BanFileError) as error:
        Reputation.open(tmp_path)

    assert str(tmp_path / LEGACY_BANS_FILE) in str(error.value) and "\n" not in str(error.value)


def test_a_store_that_is_not_one_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / BANS_FILE).write_bytes(b"not sqlite at all" * 100)

    with pytest.raises(BanFileError) as error:
        Reputation.open(tmp_path)

    assert str(tmp_path / BANS_FILE) in str(error.value) and "\n" not in str(error.value)


def test_a_failed_write_is_reported_at_flush(tmp_path: Path) -> None:
    reputation = Reputation.open(tmp_path)
    reputation.store.write([("INSERT INTO no_such_table VALUES (1)", ())])

    with pytest.raises(BanFileError) as error:
        reputation.flush()

    assert str(tmp_path / BANS_FILE) in str(error.value)
    reputation.close()
