"""Volunteers behind NAT, for real: an aggregator on the network lab's public side and two peers on a home network
behind a masquerading router, one in --client-mode and one that forgot it. Both join, train and are credited, in
the ledger and in the receipts they keep, and the DHT carries no holder record that would send a joiner to their
unreachable addresses: the one without --client-mode sees that it appears to be behind NAT and serves nothing.

Skipped, with the reason, where the lab cannot run (not root, no iproute2, no nftables, no NAT in this kernel).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from potluck.incentives.ledger import Ledger
from potluck.lab.netlab import Link, NatUnavailable, NetLab, lab_namespaces, unavailable_reason
from potluck.protocol.identity import load_or_create_identity
from tests.integration.swarm_helpers import Nodes, p2pd_pids, wait_until

pytestmark = [
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason(nat=True) is not None, reason=str(unavailable_reason(nat=True))),
]

ROUNDS = 2
SETTINGS = dict(
    rounds=ROUNDS, round_deadline_s=20, local_steps=2, inner__warmup_steps=1, inner__batch_size=4,
    data__max_bytes=200_000,
)  # fmt: skip
FAST = Link(up_bits_per_s=10**9, down_bits_per_s=10**9)
HOME = Link(up_bits_per_s=20 * 10**6, down_bits_per_s=100 * 10**6)  # a home line: slow up, fast down
# What a joiner on the public side would find on the DHT: the aggregators announced, and every holder record's
# addresses. Run inside the lab, next to the aggregator: it joins, says so, and looks when told (a line on stdin).
LOOK_UP = """
import asyncio, json, sys
from potluck.protocol.dht_schema import AGGREGATORS_KEY, parse_announcements
from potluck.protocol.holder_records import holders_key, parse_holder_records
from potluck.protocol.node import start_node

async def main():
    join, config_hash, host = sys.argv[1:4]
    node = await start_node(initial_peers=[join], host_maddrs=[f"/ip4/{host}/tcp/0"], client_mode=True)
    try:
        print("joined", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        announced = parse_announcements(await node.dht.get(AGGREGATORS_KEY, latest=True))
        # a run of 2 peers has one bucket per (shard, version); every version the run can reach is read
        keys = [holders_key(config_hash, shard=0, version=v, bucket=0) for v in range(16)]
        found = await node.dht.get_many(keys, sufficient_expiration_time=float("inf"))
        holders = [r for k in keys for r in parse_holder_records(found.get(k), config_hash=config_hash, trusted=None)]
        print(json.dumps({"announced": len(announced), "holder_maddrs": [list(r.maddrs) for r in holders]}))
    finally:
        await node.shutdown()

asyncio.run(main())
"""


def _settings() -> list[str]:
    return [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key.replace('__', '.')}={value}")]


@pytest.mark.timeout(420)
def test_peers_behind_nat_train_are_credited_and_never_named_as_holders(tmp_path: Path) -> None:
    # Prepare: the aggregator on the public side, two volunteers on a home network behind the router (one of
    # them in --client-mode, the other left to find out that it appears to be behind NAT)
    try:
        lab = NetLab([FAST], natted=[HOME, HOME])
    except NatUnavailable as e:
        pytest.skip(str(e))
    nodes = Nodes(tmp_path)
    state_dir = tmp_path / "aggregator"
    look_up: subprocess.Popen[str] | None = None
    with lab:
        names = [*lab.namespaces, lab.hub, str(lab.router)]
        try:
            aggregator = nodes.start(
                "aggregator",
                *("aggregator", "--state-dir", str(state_dir), "--host", lab.addresses[0], "--port", "0"),
                *("--http-port", "0", "--wait-for-peers", "2", *_settings()),
                wrap=lambda argv: lab.command(0, argv),
            )
            ready = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=180)
            join = ready["maddrs"][0]
            look_up = subprocess.Popen(
                lab.command(0, [sys.executable, "-c", LOOK_UP, join, ready["config_hash"], lab.addresses[0]]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            peers = [
                nodes.start(
                    f"home-{j}",
                    *("peer", "--join", join, "--identity", str(tmp_path / f"home-{j}.key")),
                    *("--receipts", str(tmp_path / f"receipts-{j}"), *(["--client-mode"] if j == 0 else [])),
                    wrap=lambda argv, node=lab.public + j: lab.command(node, argv),
                )
                for j in range(2)
            ]
            # Execute: once both peers have sent a round (a serving peer announces its state as a round starts),
            # look at the DHT from the public side while the run goes on
            for peer in peers:
                peer.next_event(lambda e: e.get("event") == "round", timeout_s=120)
            assert look_up.stdout is not None
            if look_up.stdout.readline().strip() != "joined":  # it exited: what it said is the failure's reason
                look_up.kill()
                raise AssertionError(f"the DHT lookup never joined: {look_up.communicate(timeout=20)[1][-3000:]}")
            found_text, errors = look_up.communicate("look\n", timeout=60)
            aggregator.next_event(lambda e: e.get("event") == "done", timeout_s=120)
            summaries = [p.next_event(lambda e: e.get("event") == "done", timeout_s=60) for p in peers]
        finally:
            nodes.stop()  # before the lab goes: nothing may still run in its namespaces
            if look_up is not None and look_up.poll() is None:
                look_up.kill()
                look_up.communicate(timeout=20)
    sessions = {node.child.process.pid for node in nodes.started}
    wait_until(lambda: not p2pd_pids(sessions=sessions), timeout_s=20, what="every p2pd of the test to exit")

    # Assert: both volunteers trained every round and were credited for it, in the ledger and in their receipts
    keys = [load_or_create_identity(tmp_path / f"home-{j}.key")[0].public_key for j in range(2)]
    with Ledger.open(state_dir / "ledger.sqlite", read_only=True) as ledger:
        points = ledger.points()
        rows = {key: ledger.rows(peer_public_key=key) for key in keys}
    for key, summary in zip(keys, summaries, strict=True):
        assert summary["accepted"] >= ROUNDS - 1 and summary["receipts"] >= 1 and summary["score"] > 0
        assert len(rows[key]) >= ROUNDS - 1 and points[key] > 0
        assert summary["state_bytes_served"] == 0  # nobody could dial them for it
    # the DHT is readable from the public side, and no holder record names the home network
    assert look_up is not None and look_up.returncode == 0, errors[-2000:]
    found = json.loads(found_text)
    assert found["announced"] >= 1
    home_maddrs = [m for maddrs in found["holder_maddrs"] for m in maddrs if f"/{lab.home_prefix}." in m]
    assert home_maddrs == []
    assert "not serving the state to joiners" in peers[1].log() and "behind NAT" in peers[1].log()
    assert not set(names) & set(lab_namespaces())
