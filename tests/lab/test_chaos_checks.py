"""The chaos soak's stall check: a round counts as closed when its close event was seen or its head is in a ledger."""

from types import SimpleNamespace
from typing import Any

from bench.chaos_checks import STALL_GRACE_S, stalls_of


def _soak(closes: list[dict[str, Any]], *, rounds: int = 3, deadline_s: float = 20.0) -> Any:
    return SimpleNamespace(plan=SimpleNamespace(rounds=rounds, deadline_s=deadline_s), closes=closes)


def test_a_round_cut_between_its_ledger_write_and_its_event_is_not_a_stall() -> None:
    # Prepare: rounds 0 and 2 closed with events; round 1's aggregator was killed after writing its head
    soak = _soak([{"round": 0, "round_s": 3.0}, {"round": 2, "round_s": 4.0}])
    # Execute / Assert
    assert stalls_of(soak, in_ledger={0, 1, 2}) == []


def test_a_round_neither_seen_nor_in_a_ledger_never_closed() -> None:
    soak = _soak([{"round": 0, "round_s": 3.0}, {"round": 2, "round_s": 4.0}])
    assert stalls_of(soak, in_ledger={0, 2}) == ["round 1 never closed"]


def test_a_round_past_its_deadline_and_grace_is_a_stall() -> None:
    late = 20.0 + STALL_GRACE_S + 0.1
    soak = _soak([{"round": 0, "round_s": 3.0}, {"round": 1, "round_s": late}, {"round": 2, "round_s": 4.0}])
    assert stalls_of(soak, in_ledger={0, 1, 2}) == [f"round 1 took {late} s"]
