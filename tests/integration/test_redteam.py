"""The red-team harness end to end, kept small for CI: real processes, one adversary, few rounds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.swarm_helpers import p2pd_pids, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _redteam(tmp_path: Path, attack: str, *extra: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "potluck",
        "redteam",
        "--attack",
        attack,
        "--peers",
        "5",
        "--adversaries",
        "1",
        "--rounds",
        "3",
        "--local-steps",
        "6",
        "--json",
        # Rounds close once every peer has reported; the deadline only bounds a stall, so keep it short.
        "--set",
        "round_deadline_s=15",
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.timeout(420)
def test_a_scaled_attacker_is_caught_harms_an_undefended_run_and_leaves_nothing_running(tmp_path: Path) -> None:
    before = p2pd_pids()

    report = _redteam(tmp_path, "scaled")

    assert report["adversarial_updates"] == 3 and report["tpr"] == 1.0
    assert report["honest_updates"] == 12 and report["fpr"] == 0.0
    assert abs(report["loss_vs_clean"]) < 0.05
    # The attack reaches an undefended model: with the checks off, its uploads are counted. What they do
    # to the loss in 3 rounds of 5 peers ranges from -7% to +80% (a 100x step sometimes helps early on);
    # the harm is the benchmark's to show (bench/redteam_table.py, 8 peers, docs/experiments/redteam.md).
    assert report["undefended_adversarial_counted"] >= 2
    assert all(ok for check, ok in report["verdict"].items() if check != "attack_is_real")
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=20, what="every daemon of the three swarms to exit")
