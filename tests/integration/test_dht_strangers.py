"""A stranger's DHT records change nothing: announcements of another version, another run, the same run under
its own key or claiming the real aggregator's node, and a ban list naming an honest peer, written while a peer
trains; a joiner given --join still joins the real run and trains, and the running peer keeps going.

The stranger is the red team's (potluck/lab/attackers/dht_records.py), a real process on the same DHT.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from potluck.peer.trust import read_pin
from potluck.protocol.identity import load_or_create_identity, public_key_to_hex
from tests.integration.swarm_helpers import Nodes, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]

FAST = {"local_steps": 4, "inner__warmup_steps": 2, "inner__batch_size": 8, "data__max_bytes": 400_000}
EVERY_RECORD = ["another protocol version", "another run", "the same run under its own key"]


def _in_groups(groups: set[int]) -> list[int]:
    """The live processes (a node, its p2pd) in the process groups `groups`: each node leads its own."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or it ended while we looked
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.append(int(proc.name))
    return found


@pytest.fixture
def own_nodes(tmp_path: Path) -> Iterator[Nodes]:
    """`nodes`, but checking only this test's own processes: other runs on a shared box start p2pd meanwhile."""
    started = Nodes(tmp_path)
    try:
        yield started
    finally:
        started.stop()
        groups = {n.child.process.pid for n in started.started}
        wait_until(lambda: not _in_groups(groups), timeout_s=20, what="every node of the test and its p2pd to exit")


def _is(kind: str):  # noqa: ANN202 - a predicate factory
    return lambda e: e.get("event") == kind


@pytest.mark.timeout(240)
def test_a_strangers_announcements_and_ban_list_change_nothing_for_joining_or_running_peers(own_nodes: Nodes) -> None:
    nodes = own_nodes
    # Prepare: a peer trains while a stranger writes its records, the freshest on the DHT
    aggregator = nodes.aggregator(rounds=40, round_deadline_s=20, **FAST)
    ready = aggregator.next_event(_is("ready"), timeout_s=90)
    real = ready["maddrs"][0]
    honest, _ = load_or_create_identity(nodes.work_dir / "runner.key")  # the key the peer below loads
    runner = nodes.peer("runner", real)
    stranger = nodes.start(
        "stranger",
        "--join",
        real,
        "--ban",
        public_key_to_hex(honest.public_key),
        module="potluck.lab.attackers.dht_records",
    )
    stored = stranger.next_event(_is("stored"), timeout_s=60)
    assert set(EVERY_RECORD) | {"the real aggregator's node", "a ban list"} <= set(stored["records"]), stored

    runner.next_event(_is("synced"), timeout_s=120)
    # Execute: a peer joins through the real aggregator after the stranger's records are in
    joiner = nodes.peer("joiner", real, "--max-rounds", "3")

    # Assert: it synced from the real aggregator, trained and left cleanly, never told to upgrade
    synced = joiner.next_event(_is("synced"), timeout_s=120)
    assert synced["aggregator"] == ready["fingerprint"]
    assert synced["run"] == ready["run"]
    # rounds do not wait for a joiner: its first update may be late, and a later one is kept
    first_round = joiner.next_event(lambda e: _is("round")(e) and e["accepted"], timeout_s=120)
    assert joiner.wait_exit(timeout_s=60) == 0
    # no stranger's key was ever asked for a state (not even the one claiming the real node), nor obeyed
    assert not any(e.get("event") == "state-refused" for e in joiner.all_events(timeout_s=10))
    assert "upgrade" not in joiner.log()
    # the run's key is pinned beside the joiner's identity: a restart through any node trusts only it
    real_key, _ = load_or_create_identity(nodes.work_dir / "aggregator" / "identity.key")
    assert read_pin(nodes.work_dir / "joiner.trusted-aggregators.json") == (ready["run"], {real_key.public_key})
    # ... and the running peer, named in the stranger's ban list, keeps its rounds accepted
    after = first_round["round"] + 1
    later = runner.next_event(lambda e: e.get("event") == "round" and e["round"] >= after, timeout_s=120)
    assert later["accepted"], later["reason"]
    assert runner.child.process.poll() is None
