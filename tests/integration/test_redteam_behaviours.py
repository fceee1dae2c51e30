"""Every red-team behaviour in a real swarm of 6 peers, 2 of them misbehaving: the run completes, no round
stalls, bad uploads are caught and honest ones kept.

Only the attacked swarm runs here (the clean and undefended comparisons, the loss bars and the 8-peer
swarms of issue 4 are the benchmark's: bench/redteam_table.py); tiny model, 3 rounds of 3 inner steps,
6 processes rather than 8 (a third of them adversarial, a harsher ratio than the benchmark's quarter),
so that fifteen swarms fit the suite's budget on 2 cores: each process's start-up (torch, hivemind,
p2pd) is most of a swarm's time there.
"""

from pathlib import Path

import pytest

from potluck.lab.redteam.attacks import ATTACKS
from potluck.lab.redteam.harness import FILTER_EVADING, rates, run_attacked
from potluck.protocol.config import RunConfig
from tests.integration.swarm_helpers import p2pd_pids, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUNDS = 3
PEERS, ADVERSARIES = 6, 2
DEADLINE_S = 9.0  # the behaviours that never report (forged, stale, ...) cost a deadline a round
CFG = RunConfig().with_overrides(
    {
        "rounds": ROUNDS,
        "local_steps": 3,
        "inner.warmup_steps": 2,
        "inner.batch_size": 8,
        "data.max_bytes": 400_000,
        "round_deadline_s": DEADLINE_S,
        # the codec's starting density all run long: on loopback the adaptive one climbs to 1/2, where decoding
        # the aggregates costs more CPU than training does, and nothing here is about the density
        "max_density": None,
    },
    source="test",
)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_two_of_six_misbehaving_peers_are_caught_and_the_run_completes(attack: str, tmp_path: Path) -> None:
    before = p2pd_pids()

    result = run_attacked(
        CFG, attack=attack, peers=PEERS, adversaries=ADVERSARIES, shared=tmp_path / "shared", timeout_s=240
    )

    found = rates(result)
    assert result.rounds_completed == ROUNDS
    # No stall: once everyone has started (round 0 waits for the peers to start), a round closes by its
    # deadline plus the aggregation, whoever misbehaves in it.
    assert max(r["round_s"] for r in result.rounds[1:]) < DEADLINE_S + 10, [r["round_s"] for r in result.rounds]
    assert found["honest_updates"] == (PEERS - ADVERSARIES) * ROUNDS and found["fpr"] <= 0.05, found
    if attack not in FILTER_EVADING:
        assert found["tpr"] >= 0.95, found
    assert all(p["accepted"] == ROUNDS for p in result.peers if not p["adversary"])
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=20, what="every p2pd of the swarm to exit")
