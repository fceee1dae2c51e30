"""The swarm as users run it: real aggregator and peer processes on 127.0.0.1 talking through hivemind.

Every test uses the tiny model with few inner steps, has a hard timeout, synchronises on the events
the nodes print (never on sleeps), and leaves no p2pd behind (the `nodes` fixture checks).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from potluck.lab.swarm import PEER_NICE
from potluck.protocol.identity import generate_identity, save_identity
from tests.integration.swarm_helpers import Nodes, free_port, p2pd_pids, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]

FAST = {"local_steps": 8, "inner__warmup_steps": 4, "inner__batch_size": 8, "data__max_bytes": 400_000}


def _is(kind: str, **fields: object):  # noqa: ANN202 - a predicate factory
    return lambda e: e.get("event") == kind and all(e.get(k) == v for k, v in fields.items())


DEADLINE_S = 4.0


@pytest.mark.timeout(240)
def test_swarm_of_three_trains_and_leaves_nothing_running(tmp_path: Path) -> None:
    # Prepare: one peer at a quarter speed, rounds time-boxed to a deadline the fast peers fit in
    before = p2pd_pids()
    command = [
        sys.executable,
        "-m",
        "potluck",
        "swarm",
        "--peers",
        "3",
        "--rounds",
        "4",
        "--local-steps",
        "10",
        "--peer-speeds",
        "1,1,0.25",
        "--set",
        "data.max_bytes=400000",
        "--set",
        f"round_deadline_s={DEADLINE_S}",
        "--json",
    ]
    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, cwd=tmp_path)
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["rounds_completed"] == 4
    assert len(result["peers"]) == 3
    assert all(p["accepted"] >= 1 and p["bytes_up"] > 0 and p["bytes_down"] > 0 for p in result["peers"])
    assert result["final_val_loss"] < result["initial_val_loss"] - 0.5
    assert result["aggregator_multiaddrs"][0].startswith("/ip4/127.0.0.1/tcp/")
    # its output is piped, so no progress bar is drawn: a status line per round tells CI and `docker logs`
    status = [line.split(" done | ")[0] for line in done.stderr.splitlines() if " done | held-out loss " in line]
    assert status == ["round 1/4", "round 2/4", "round 3/4", "round 4/4"], done.stderr[-2000:]
    assert "━" not in done.stderr, done.stderr[-2000:]  # nor the bar's last frame, cut at the pipe's width
    # no round waited for the slow peer past its deadline (closing takes a moment more), and its tokens count
    assert all(r["round_s"] < DEADLINE_S + 2 for r in result["rounds"]), [r["round_s"] for r in result["rounds"]]
    slow = result["peers"][2]
    assert slow["speed"] == 0.25 and slow["accepted"] >= 1
    # the peers yield the CPU to the aggregator, whose round close they all wait on
    assert all(p["nice"] == max(PEER_NICE, os.getpriority(os.PRIO_PROCESS, 0)) for p in result["peers"])
    credited = {a["fingerprint"] for r in result["rounds"] for a in r["accepted"]}
    assert slow["fingerprint"] in credited
    for peer in result["peers"]:
        assert (
            peer["inner_steps"] >= 4
            and peer["tokens"]
            == peer["inner_steps"] * result["peers"][0]["tokens"] // result["peers"][0]["inner_steps"]
        )
        assert 0 < peer["compute_utilization"] <= 1
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=10, what="the swarm's daemons to exit")


@pytest.mark.timeout(180)
def test_a_peer_killed_mid_round_costs_one_deadline_not_a_stall(nodes: Nodes) -> None:
    # Prepare: two peers; once both have contributed, one dies without a word.
    aggregator = nodes.aggregator(rounds=5, round_deadline_s=12, **FAST)
    join = aggregator.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    survivor = nodes.peer("survivor", join)
    victim = nodes.peer("victim", join)
    first = aggregator.next_event(lambda e: e.get("event") == "round" and len(e["accepted"]) == 2, timeout_s=90)
    # Execute
    victim.kill()
    # Assert: the next round closes at its deadline with the survivor's update, and the run goes on.
    stalled = aggregator.next_event(
        lambda e: e.get("event") == "round" and e["round"] > first["round"] and len(e["accepted"]) == 1,
        timeout_s=60,
    )
    assert stalled["closed_by"] in ("deadline", "all-reported")
    assert stalled["round_s"] < 12 + 8
    following = aggregator.next_event(_is("round", round=stalled["round"] + 1), timeout_s=30)
    assert following["closed_by"] == "all-reported"  # the dead peer is no longer waited for
    assert survivor.wait_exit(timeout_s=60) == 0


@pytest.mark.timeout(180)
def test_a_late_joiner_is_credited_once_it_has_caught_up(nodes: Nodes) -> None:
    # Prepare
    aggregator = nodes.aggregator(rounds=40, **FAST)  # enough rounds to outlast the joiner's start-up
    join = aggregator.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    nodes.peer("early", join)
    aggregator.next_event(_is("round", round=1), timeout_s=90)
    # Execute
    late = nodes.peer("late", join, "--plan")
    # Assert: rounds do not wait for a joiner (its request proves nothing), so it is credited once its update
    # comes in time; an update that came late was refused for its round, not struck
    synced = late.next_event(_is("synced"), timeout_s=90)
    assert synced["round"] >= 2
    plan = late.next_event(_is("plan"), timeout_s=60)  # its start-up self-benchmark, before its first round
    assert plan["step_s"] > 0 and plan["up_bits_per_s"] > 0 and plan["upload_bytes"] > 0
    assert 0 < plan["K_potluck"] <= 1 and plan["local_steps_for_k_potluck"] >= 1
    first_round = late.next_event(_is("round"), timeout_s=90)
    assert first_round["round"] == synced["round"]
    assert first_round["accepted"] or first_round["reason"].startswith("round: "), first_round["reason"]
    credited = aggregator.next_event(
        lambda e: e.get("event") == "round" and synced["fingerprint"] in {a["fingerprint"] for a in e["accepted"]},
        timeout_s=90,
    )
    following = aggregator.next_event(_is("round", round=credited["round"] + 1), timeout_s=60)
    assert synced["fingerprint"] in {a["fingerprint"] for a in following["accepted"]}  # waited for from then on
    os.kill(late.child.process.pid, signal.SIGTERM)  # it has shown all it can: no need to wait out the run's 40 rounds
    assert late.wait_exit(timeout_s=30) == 130


@pytest.mark.timeout(180)
def test_overlapped_peers_train_while_their_update_is_in_flight_up_to_their_limit_and_every_update_counts(
    nodes: Nodes,
) -> None:
    # Prepare: two overlapped peers, one limited to half a round ahead, and one at half speed, so that the
    # other two wait on every round's close
    aggregator = nodes.aggregator(rounds=4, **FAST)
    ready = aggregator.next_event(_is("ready"), timeout_s=90)
    join = ready["maddrs"][0]
    free = nodes.peer("free", join, "--overlap")
    limited = nodes.peer("limited", join, "--overlap", "--overlap-limit", "0.5")
    slow = nodes.peer("slow", join, "--overlap", "--speed", "0.5")
    # Execute: the whole run
    ran_free, ran_limited = (
        [node.next_event(_is("round", round=r), timeout_s=90) for r in range(4)] for node in (free, limited)
    )
    # Assert: both trained through the wait, the limited one no further than half a round, and every update counted
    for rounds in (ran_free, ran_limited):
        assert all(r["accepted"] for r in rounds), [r["reason"] for r in rounds]
        assert rounds[0]["stale_steps"] == 0  # nothing in flight before the first round
        assert all(r["inner_steps"] == FAST["local_steps"] for r in rounds)
    assert any(r["stale_steps"] > FAST["local_steps"] // 2 for r in ran_free[1:]), [r["stale_steps"] for r in ran_free]
    stale = [r["stale_steps"] for r in ran_limited]
    assert max(stale) == FAST["local_steps"] // 2, stale  # it reached its limit, waited there, then went on
    closed = [aggregator.next_event(_is("round", round=r), timeout_s=60) for r in range(4)]
    assert len(closed[-1]["accepted"]) == 3
    assert closed[-1]["val_loss"] < ready["val_loss"] - 1.0
    assert all(node.wait_exit(timeout_s=60) == 0 for node in (free, limited, slow))


@pytest.mark.timeout(240)
def test_a_restarted_aggregator_resumes_at_the_same_round_and_state(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: a fixed port and state directory, so the restarted aggregator has the same multiaddr.
    port = free_port()
    state_dir = tmp_path / "durable"
    settings = dict(rounds=5, round_deadline_s=20, **FAST)
    first = nodes.aggregator("first", state_dir=state_dir, port=port, **settings)
    join = first.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    peer = nodes.peer("peer", join, "--reconnect-timeout", "120")
    closed = first.next_event(_is("round", round=1), timeout_s=90)
    # Execute: crash it (SIGKILL, p2pd included), then start it again on the same directory.
    first.kill()
    second = nodes.aggregator("second", state_dir=state_dir, port=port, **settings)
    ready = second.next_event(_is("ready"), timeout_s=90)
    # Assert
    assert ready["resumed"] is True
    assert ready["round"] >= 2
    if ready["round"] == 2:
        assert ready["state_sha256"] == closed["state_sha256"]
    assert ready["maddrs"][0] == join
    second.next_event(_is("round", round=4), timeout_s=120)  # the peer came back and the run finished
    assert peer.wait_exit(timeout_s=60) == 0
    assert peer.next_event(_is("done"), timeout_s=5)["accepted"] >= 4


@pytest.mark.timeout(60)
def test_a_malformed_join_address_fails_in_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "potluck", "peer", "--join", "/ip4/1.2.3/tcp/x", "--identity", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a valid multiaddr" in lines[0] and "/p2p/" in lines[0], done.stderr
    assert time.monotonic() - started < 30


@pytest.mark.timeout(90)
def test_an_unreachable_join_address_fails_in_one_line_within_its_timeout(tmp_path: Path) -> None:
    before = p2pd_pids()
    save_identity(generate_identity(), tmp_path / "k")  # no "created identity" notice: only the error is printed
    unreachable = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/QmXJLDq74mBg7WNSh2E6wcmcjvDjFCRNQxoTnxJdaGmcRi"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "potluck",
            "peer",
            "--join",
            unreachable,
            "--join-timeout",
            "5",
            "--identity",
            str(tmp_path / "k"),
        ],
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not join" in lines[0], done.stderr
    assert time.monotonic() - started < 60
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=10, what="the peer's daemon to exit")


def _sigint_as_in_a_terminal() -> None:
    """A foreground command gets Ctrl-C; a suite started in the background of a script ignores it (POSIX)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_whole_swarm(tmp_path: Path, sig: signal.Signals) -> None:
    # Prepare
    before = p2pd_pids()
    swarm = subprocess.Popen(
        [sys.executable, "-m", "potluck", "swarm", "--peers", "2", "--rounds", "200", "--local-steps", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
        preexec_fn=_sigint_as_in_a_terminal,  # noqa: PLW1509  # only signal.signal, before exec
    )
    try:
        assert swarm.stderr is not None
        for line in swarm.stderr:  # the join line comes once the aggregator is serving
            if "peer --join" in line or "/p2p/" in line:
                break
        wait_until(lambda: len(p2pd_pids() - before) >= 3, timeout_s=60, what="both peers' daemons")
        # Execute
        os.kill(swarm.pid, sig)
        code = swarm.wait(timeout=60)
    finally:
        if swarm.poll() is None:
            os.killpg(swarm.pid, signal.SIGKILL)
            swarm.wait()
        for stream in (swarm.stdout, swarm.stderr):
            if stream is not None:
                stream.close()
    # Assert
    assert code == 130
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=15, what="every daemon of the swarm to exit")


@pytest.mark.timeout(150)
def test_ctrl_c_on_a_peer_leaves_cleanly_without_a_traceback(nodes: Nodes) -> None:
    # Prepare
    aggregator = nodes.aggregator(rounds=200, **FAST)
    join = aggregator.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    peer = nodes.peer("peer", join)
    peer.next_event(_is("round"), timeout_s=90)
    before = p2pd_pids()
    # Execute: what a terminal does on Ctrl-C: SIGINT to the whole foreground group, p2pd included
    os.killpg(peer.child.process.pid, signal.SIGINT)
    code = peer.wait_exit(timeout_s=20)
    # Assert
    assert code == 130
    log = peer.log()
    assert "Traceback" not in log, log
    assert "interrupted: the node and its p2pd have stopped" in log
    wait_until(lambda: len(before - p2pd_pids()) == 1, timeout_s=10, what="the peer's p2pd to exit")
