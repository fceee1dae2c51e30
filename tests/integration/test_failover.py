"""Aggregator fail-over with real processes: a standby follows its primary's aggregates, takes the shard over
when the primary is killed, and the peers switch to it and finish the run, with no round of state lost."""

from pathlib import Path

import pytest

from potluck.aggregator_server.checkpoint import load_checkpoint
from potluck.protocol.config import RunConfig
from potluck.protocol.config_files import dump_run_config, load_run_config
from potluck.protocol.identity import load_or_create_identity, public_key_to_hex
from potluck.training.diloco import state_sha256
from tests.integration.swarm_helpers import Nodes

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _is(kind: str, **fields: object):  # noqa: ANN202 - a predicate factory
    return lambda e: e.get("event") == kind and all(e.get(k) == v for k, v in fields.items())


def _run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run whose one shard has two aggregators: the first key owns it, the second stands by."""
    keys = [tmp_path / "primary.key", tmp_path / "standby.key"]
    listed = [public_key_to_hex(load_or_create_identity(k)[0].public_key) for k in keys]
    cfg = RunConfig().with_overrides(
        {
            "rounds": 6,
            "local_steps": 12,
            "inner.warmup_steps": 2,
            "inner.batch_size": 8,
            "data.max_bytes": 400_000,
            "round_deadline_s": 30,
            "aggregator_keys": listed,
        },
        source="test",
    )
    config = tmp_path / "run.toml"
    config.write_text(dump_run_config(cfg))
    return config, keys[0], keys[1]


def _aggregator(nodes: Nodes, name: str, config: Path, key: Path, *args: str):  # noqa: ANN202
    state = nodes.work_dir / name
    common = ["--config", str(config), "--identity", str(key), "--state-dir", str(state), "--host", "127.0.0.1"]
    return nodes.start(name, "aggregator", *common, "--http-port", "0", *args)


@pytest.mark.timeout(420)
def test_a_killed_primary_hands_its_shard_to_the_standby_and_the_run_goes_on(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: the primary, its standby (following it), and two peers
    config, primary_key, standby_key = _run(tmp_path)
    primary = _aggregator(nodes, "primary", config, primary_key, "--wait-for-peers", "2")
    join = primary.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    standby = _aggregator(nodes, "standby", config, standby_key, "--join", join, "--failover-after", "5")
    ready = standby.next_event(_is("ready"), timeout_s=90)
    assert ready["standby_of"] is not None
    standby.next_event(_is("following"), timeout_s=60)
    peers = [nodes.peer(f"peer-{i}", join) for i in range(2)]
    # Execute: kill the primary as soon as the standby holds round 1's result
    standby.next_event(_is("followed", round=1), timeout_s=240)
    primary.kill()
    # Assert: the standby takes over from exactly the primary's last durable state (it checkpoints a round's
    # result before it publishes it): nothing the primary committed is lost
    takeover = standby.next_event(_is("takeover"), timeout_s=120)
    run = load_run_config(nodes.work_dir / "primary" / "run.toml")  # the run as created: with its fingerprint
    committed = load_checkpoint(nodes.work_dir / "primary", config_hash=run.config_hash)
    assert committed is not None and committed.round >= 2
    assert (takeover["round"], takeover["state_sha256"]) == (committed.round, state_sha256(committed.params).hex())
    # the run goes on within two rounds: the standby closes the very next round with both peers in it
    resumed = standby.next_event(_is("round", round=takeover["round"]), timeout_s=180)
    assert len(resumed["accepted"]) == 2
    for peer in peers:
        moved = peer.next_event(_is("failover"), timeout_s=120)
        assert moved["to"] == ready["fingerprint"]
        assert peer.wait_exit(timeout_s=240) == 0
        rounds = [e for e in peer.all_events(timeout_s=30) if e.get("event") == "round"]
        assert [e["round"] for e in rounds] == list(range(6))  # every round trained once, none skipped
    assert standby.next_event(_is("done"), timeout_s=60)["round"] == 6


@pytest.mark.timeout(300)
def test_a_peer_that_joins_while_the_primary_is_dead_syncs_from_its_standby(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: the primary dies before any peer joins; its announcement lingers on the DHT for a minute
    config, primary_key, standby_key = _run(tmp_path)
    primary = _aggregator(nodes, "primary", config, primary_key)
    join = primary.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    standby = _aggregator(nodes, "standby", config, standby_key, "--join", join, "--failover-after", "5")
    ready = standby.next_event(_is("ready"), timeout_s=90)
    standby.next_event(_is("following"), timeout_s=60)
    primary.kill()
    # Execute: a peer joins the DHT through the standby's node before the standby has taken over
    peer = nodes.peer("late", ready["maddrs"][0], "--max-rounds", "1")
    # Assert: it finds the dead primary first, then syncs from the standby once that announces itself
    assert standby.next_event(_is("takeover"), timeout_s=120)["round"] == 0
    synced = peer.next_event(_is("synced"), timeout_s=120)
    assert synced["aggregator"] == ready["fingerprint"]
    assert peer.next_event(_is("round"), timeout_s=120)["accepted"]
    assert peer.wait_exit(timeout_s=60) == 0
