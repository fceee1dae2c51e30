"""`potluck redteam` with a network attack, kept small: an honest swarm calm, then with the attacker against it."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.swarm_helpers import wait_until
from tests.integration.test_redteam import _carrying

pytestmark = [pytest.mark.network, pytest.mark.slow]

ATTACK = "stranger-uploads"  # cheap: one libp2p client, no descriptor floods


@pytest.mark.timeout(420)
def test_a_network_attack_runs_against_the_attacked_swarm_and_is_reported_beside_the_calm_one(tmp_path: Path) -> None:
    # Prepare: every process the command starts inherits the marker, so none may outlive it
    token = uuid.uuid4().hex
    command = [sys.executable, "-m", "potluck", "redteam", "--attack", ATTACK, "--peers", "3", "--rounds", "3"]
    command += ["--local-steps", "4", "--set", "round_deadline_s=30", "--set", "data.max_bytes=400000", "--json"]
    command += ["--no-calm-after"]  # two swarms, not three: this test checks the shape, not the bound
    launcher = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, POTLUCK_TEST_LAUNCH=token),
        start_new_session=True,
    )
    try:
        # Execute
        out, err = launcher.communicate(timeout=380)
        # Assert: both runs reported in full, and the attacker ran against the attacked one
        assert launcher.returncode == 0, err[-2000:]
        report = json.loads(out)
        assert report["attack"] == ATTACK and report["peers"] == 3
        for run in ("calm", "attacked"):
            row = report[run]
            assert row["rounds"] == 3 and row["median_round_s"] > 0, report
            assert row["honest_accepted"] + row["honest_rejected"] == 9, report
        assert report["attacker"]["sent"] > 0, report
        assert report["round_time_ratio"] > 0
        assert set(report["verdict"]) == {
            "round_time_within_1.5x",
            "no_honest_update_lost",
            "no_deadline_round",
            "attack_ran",
        }
        assert report["verdict"]["attack_ran"]
        wait_until(lambda: not _carrying(f"POTLUCK_TEST_LAUNCH={token}"), timeout_s=20, what="every child to exit")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGTERM)  # it stops its swarm and attacker on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=40)
        for pid in _carrying(f"POTLUCK_TEST_LAUNCH={token}"):  # only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
