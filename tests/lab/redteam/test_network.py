"""The network-attack harness's pure parts: the attacker's counters, a run's row, the verdict, the libp2p sender."""

import asyncio
from typing import Any

from potluck.cli.common import stdout
from potluck.cli.redteam import NETWORK_ATTACK_NAMES, print_network_report
from potluck.lab.attackers.stranger_uploads import libp2p_send, stranger_update
from potluck.lab.redteam.network import (
    NETWORK_ATTACKS,
    Target,
    attacker_counters,
    network_verdict,
    round_time_ratio,
    run_summary,
)
from potluck.lab.swarm import SwarmResult


def _round(index: int, seconds: float, closed_by: str, accepted: list[str]) -> dict[str, Any]:
    return {"round": index, "round_s": seconds, "closed_by": closed_by, "accepted": [{"update": u} for u in accepted]}


def _result(rounds: list[dict[str, Any]], uploads: list[list[str]]) -> SwarmResult:
    peers = [{"name": f"peer-{i}", "adversary": False, "uploads": u, "joined_round": 0} for i, u in enumerate(uploads)]
    return SwarmResult(
        initial_val_loss=4.0,
        final_val_loss=3.5,
        rounds_completed=len(rounds),
        aggregator_multiaddrs=[],
        num_params=1,
        peers=peers,
        rounds=rounds,
        wall_s=1.0,
    )


def test_the_command_offers_every_network_attack_the_harness_runs() -> None:
    assert set(NETWORK_ATTACK_NAMES) == set(NETWORK_ATTACKS)


def test_every_attacker_is_aimed_at_the_target_it_is_given() -> None:
    target = Target(join="/ip4/127.0.0.1/tcp/1/p2p/Qm", http_port=8123)

    for name, attack in NETWORK_ATTACKS.items():
        args = attack.args(target)
        assert target.join in args or str(target.http_port) in args, name
        assert attack.module.startswith("potluck.lab.attackers."), name


def test_counters_are_the_latest_numbers_lists_counted_and_mappings_flattened() -> None:
    lines = [
        {"event": "attack", "time_s": 1.0, "sent": 50, "answers": {"run": 49}},
        {"event": "stored", "records": ["a", "b", "c"], "ok": True},
        {"event": "attack", "time_s": 2.0, "sent": 100, "answers": {"run": 98, "busy": 2}},
    ]

    counters = attacker_counters(lines)

    assert counters == {"sent": 100, "answers.run": 98, "answers.busy": 2, "records": 3}


def test_a_runs_row_times_the_rounds_after_the_first_and_counts_honest_uploads_never_counted() -> None:
    rounds = [
        _round(0, 30.0, "all-reported", ["a0", "b0"]),
        _round(1, 2.0, "all-reported", ["a1", "b1"]),
        _round(2, 4.0, "deadline", ["a2"]),
        _round(3, 3.0, "all-reported", ["a3", "b3"]),
    ]

    row = run_summary(_result(rounds, [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]]))

    assert row["rounds"] == 4 and row["median_round_s"] == 3.0 and row["joined_rounds"] == [0, 0]
    assert row["closed_by_deadline"] == 1 and row["deadline_rounds"] == [2]
    assert (row["honest_accepted"], row["honest_rejected"]) == (7, 1)


def _report(ratio: float | None, *, lost: int = 0, deadline: int = 0, counters: dict[str, int]) -> dict[str, Any]:
    calm = {"honest_rejected": 0, "closed_by_deadline": 0}
    attacked = {"honest_rejected": lost, "closed_by_deadline": deadline}
    return {"calm": calm, "attacked": attacked, "round_time_ratio": ratio, "attacker": counters}


def test_the_verdict_holds_an_attack_that_ran_to_the_calm_runs_bars() -> None:
    assert all(network_verdict(_report(1.2, counters={"sent": 10})).values())

    failed = network_verdict(_report(1.6, lost=1, deadline=2, counters={"sent": 0}))

    assert not any(failed.values()), failed
    assert not network_verdict(_report(None, counters={"sent": 1}))["round_time_within_1.5x"]


def test_the_libp2p_sender_uploads_through_the_links_submit_and_returns_its_receipt() -> None:
    calls: list[tuple[bytes, float]] = []
    receipt = object()

    class Link:
        async def submit(self, update: Any, payload: bytes, *, timeout_s: float) -> tuple[Any, Any]:
            calls.append((payload, timeout_s))
            return receipt, None

    update, payload = stranger_update()
    send = libp2p_send(Link(), timeout_s=7.0)  # type: ignore[arg-type]

    assert asyncio.run(send(update, payload)) is receipt
    assert calls == [(payload, 7.0)]


def test_the_table_sets_the_attacked_run_beside_the_calm_one_with_the_attackers_counters_and_the_verdict() -> None:
    row = {"rounds": 3, "median_round_s": 2.0, "honest_accepted": 9, "honest_rejected": 0}
    calm = row | {"closed_by_deadline": 0, "deadline_rounds": []}
    attacked = row | {"median_round_s": 2.5, "closed_by_deadline": 1, "deadline_rounds": [0]}
    report = {"attack": "fake-joiners", "what": "fakes", "peers": 3, "calm": calm, "attacked": attacked}
    report |= {"round_time_ratio": 1.25, "attacker": {"sent": 12}}

    with stdout.capture() as captured:
        print_network_report(report, rounds=3)

    text = " ".join(captured.get().split())  # as wide as the terminal: lines may wrap anywhere
    assert "1.25x" in text and "1 [0]" in text and "sent 12" in text
    assert "no_deadline_round: NOT MET" in text and "attack_ran: ok" in text


def test_the_round_time_ratio_is_taken_over_the_slower_calm_run() -> None:
    report = {"calm": {"median_round_s": 2.0}, "attacked": {"median_round_s": 3.0}}

    assert round_time_ratio(report) == 1.5
    assert round_time_ratio(report | {"calm_after": {"median_round_s": 4.0}}) == 0.75
    assert round_time_ratio(report | {"attacked": {"median_round_s": None}}) is None
