"""The chaos soak, short: a peer and the aggregator are killed and restarted mid-run, one peer's disk is full,
and nothing acknowledged is lost (bench/chaos.py runs the long one, with a standby take-over and a calm run)."""

from pathlib import Path

import pytest

from bench.chaos import run
from bench.chaos_plan import Action, Plan
from tests.integration.swarm_helpers import alive_in_groups, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.mark.timeout(480)
def test_a_swarm_killed_and_restarted_mid_run_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    # Prepare: 3 peers (the last with a full disk), 4 rounds; kill -9 a peer (back at once) and the aggregator
    plan = Plan(peers=3, rounds=4, takeover=False, full_disk=True, deadline_s=20.0, timeout_s=400.0, end_grace_s=30.0)
    actions = [
        Action(round=1, kind="kill-peer", target="peer-0", delay_s=0.5),
        Action(round=1, kind="restart-peer", target="peer-0", delay_s=1.0),
        Action(round=2, kind="kill-aggregator", target="aggregator", delay_s=0.5),
    ]
    # Execute
    result = run(plan, work_dir=tmp_path, say=print, actions=actions)  # shown when it fails
    # Assert: every round closed in time, and the run's records hold together
    assert result["counts"] == {"peer_kills": 1, "peer_restarts": 1, "aggregator_kills": 1, "aggregator_restarts": 1}
    assert result["rounds_completed"] == 4
    assert (result["stalls"], result["crashes"]) == ([], [])
    [ledger] = result["ledgers"]
    assert ledger["ok"] and ledger["exit"] == 0 and ledger["heads_checked"] == 4
    assert result["receipts"]["checked"] > 0 and result["receipts"]["bad"] == []
    assert result["merkle"]["aggregates_checked"] > 0 and result["merkle"]["mismatched"] == []
    assert result["acknowledged"]["final_receipts"] > 0 and result["acknowledged"]["lost"] == []
    # the full disk costs its peer its receipts, with one clear line each, and neither it nor the swarm stops
    full = result["full_disk"]
    assert full["receipts_kept"] == 0 and full["final_receipts_acked"] > 0
    assert full["errors"] and "check the disk or --receipts" in full["errors"][0]
    assert result["ok"]
    # every child and its p2pd is gone (each ran in a process group of its own)
    groups = set(result["process_groups"])
    assert len(groups) == 6  # the aggregator twice, three peers, the killed one again
    wait_until(lambda: not alive_in_groups(groups), timeout_s=30, what="the soak's children and p2pd to exit")
