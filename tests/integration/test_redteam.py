"""The red-team harness end to end, kept small for CI: real processes, one adversary, few rounds."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
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
        # the codec's starting density throughout, as in test_redteam_behaviours: nothing here is about the density
        "--set",
        "max_density=null",
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    # piped, as in CI: a status line per round of each swarm all the same
    assert all(f"attacked: round {r}/3, held-out loss" in done.stderr for r in (1, 2, 3)), done.stderr[-2000:]
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


def _carrying(marker: str, *, program: bytes = b"") -> set[int]:
    """Live processes started with `marker` in their environment (a launcher and everything it started), or
    only those whose program's path contains `program`."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            executable = (proc / "cmdline").read_bytes().split(b"\0")[0]
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone while we looked, or not ours to read
        if marker.encode() in environ.split(b"\0") and program in executable and state != "Z":
            found.add(int(proc.name))
    return found


@pytest.mark.timeout(120)
def test_sigterm_stops_the_red_team_and_everything_it_started(tmp_path: Path) -> None:
    # Prepare: a red team long enough to be stopped in its first swarm; every process it starts inherits the marker
    token = uuid.uuid4().hex
    marker = f"POTLUCK_TEST_LAUNCH={token}"
    command = [sys.executable, "-m", "potluck", "redteam", "--attack", "scaled", "--peers", "2", "--adversaries", "1"]
    command += ["--rounds", "200", "--local-steps", "3", "--set", "data.max_bytes=400000"]
    with open(tmp_path / "redteam.log", "w") as log:
        redteam = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=tmp_path,
            env=dict(os.environ, POTLUCK_TEST_LAUNCH=token),
            start_new_session=True,
        )
    try:
        daemons = lambda: _carrying(marker, program=b"p2pd")  # noqa: E731
        wait_until(lambda: len(daemons()) >= 3, timeout_s=90, what="the aggregator's and both peers' daemons")
        started = _carrying(marker) - {redteam.pid}
        # Execute: what `timeout`, `docker stop` and systemd send
        os.kill(redteam.pid, signal.SIGTERM)
        code = redteam.wait(timeout=40)
        # Assert: it exited as from Ctrl-C, after stopping its fork server, aggregator, peers and their daemons
        assert code == 130, (tmp_path / "redteam.log").read_text()[-2000:]
        assert len(started) >= 7  # the fork server, the aggregator and two peers, and their three daemons
        wait_until(lambda: not _carrying(marker), timeout_s=15, what="every process of the red team to exit")
    finally:
        if redteam.poll() is None:
            os.killpg(redteam.pid, signal.SIGKILL)
            redteam.wait()
        for pid in _carrying(marker):  # only what this test started: a failed run must not leave it running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
