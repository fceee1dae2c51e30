"""Serverless mode as users run it: `potluck swarm --serverless` starts peers and no aggregator; they average
among themselves through hivemind's DecentralizedAverager (real processes, real DHT, real all-reduce)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.swarm_helpers import Nodes, p2pd_pids, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_a_swarm_without_an_aggregator_trains_together_and_leaves_nothing_running(tmp_path: Path) -> None:
    # Prepare
    before = p2pd_pids()
    command = [sys.executable, "-m", "potluck", "swarm", "--serverless", "--peers", "3", "--rounds", "4"]
    command += ["--local-steps", "10", "--set", "data.max_bytes=400000", "--json", "--timeout", "240"]
    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=270, cwd=tmp_path)
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["rounds_completed"] == 4 and result["aggregator_multiaddrs"] == []
    assert result["final_val_loss"] < result["initial_val_loss"] - 0.5
    peers = result["peers"]
    assert [p["joined_round"] for p in peers] == [0, 0, 0]
    assert [p["state_from"] for p in peers] == ["seed", "peer", "peer"]  # the joiners downloaded peer-0's state
    assert all(len(p["rounds"]) == 4 and p["inner_steps"] == 40 for p in peers)
    # they trained together: every peer averaged in a group of more than itself in most rounds
    assert all(sum(g > 1 for g in p["groups"]) >= 3 for p in peers), [p["groups"] for p in peers]
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=15, what="the swarm's daemons to exit")


def test_serverless_refuses_what_it_cannot_do_in_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "potluck", "swarm", "--serverless", "--overlap", "--json"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert done.returncode == 2 and done.stdout == ""
    assert "--serverless runs peers only, on 127.0.0.1: drop --link, --overlap, --state-dir and --aggregators" in (
        done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(240)
def test_potluck_status_reads_a_live_serverless_run_from_the_dht(nodes: Nodes) -> None:
    # Prepare: two serverless peers, the second joining the first, many short rounds
    settings = ["--set", "local_steps=4", "--set", "rounds=50", "--set", "data.max_bytes=400000"]
    first = nodes.start(
        "first", "peer", "--serverless", "--host", "127.0.0.1", "--identity", str(nodes.work_dir / "a.key"), *settings
    )
    join = first.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    second = nodes.start(
        "second", "peer", "--serverless", "--join", join, "--identity", str(nodes.work_dir / "b.key"), *settings
    )
    for node in (first, second):
        node.next_event(lambda e: e.get("event") == "round", timeout_s=120)
    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "potluck", "status", "--join", join, "--json"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(done.stdout)["runs"]
    assert list(runs) == ["potluck-default"]
    peers = runs["potluck-default"]
    assert len(peers) == 2 and all(p["rounds"] == 50 and p["val_loss"] > 0 for p in peers)
    # and SIGTERM stops a peer mid-run within seconds, also the one left alone looking for a group (it once
    # waited on its stopped averager until killed)
    for node in (second, first):
        os.kill(node.child.process.pid, signal.SIGTERM)
        assert node.wait_exit(timeout_s=15) == 130
        assert "interrupted: the node and its p2pd have stopped" in node.log()
        assert "Traceback" not in node.log(), node.log()


def test_potluck_status_names_an_address_it_cannot_parse_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "potluck", "status", "--join", "/ip4/127.0.0.1/tcp/1"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "p2p" in done.stderr
