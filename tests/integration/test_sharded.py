"""Sharded aggregators as users run them: `potluck swarm --aggregators 2` cuts the model in two, each half
with an aggregator process of its own; every peer uploads each half to its owner and applies both aggregates
(real processes, real DHT, real libp2p streams)."""

import asyncio
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from potluck.protocol.client import AggregatorLink
from potluck.protocol.config import RunConfig
from potluck.protocol.config_files import dump_run_config
from potluck.protocol.envelope import new_nonce, sign_update
from potluck.protocol.identity import Identity, generate_identity, load_or_create_identity, public_key_to_hex
from potluck.protocol.node import parse_join_address, peer_id_of, start_node
from potluck.protocol.shards import shard_names
from potluck.training.models import model_config, parameter_shapes
from tests.integration.swarm_helpers import Nodes, p2pd_pids, signed_test_update, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_two_shard_aggregators_train_the_model_and_split_the_ingest(tmp_path: Path) -> None:
    # Prepare
    before = p2pd_pids()
    command = [sys.executable, "-m", "potluck", "swarm", "--aggregators", "2", "--peers", "2", "--rounds", "3"]
    command += ["--local-steps", "10", "--set", "data.max_bytes=400000", "--http-port", "0", "--json"]
    command += ["--timeout", "240"]
    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=270, cwd=tmp_path)
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["rounds_completed"] == 3
    assert result["final_val_loss"] < result["initial_val_loss"] - 0.5  # scored by peer-0 on its whole model
    cfg = RunConfig()
    spec = parameter_shapes(model_config(cfg.model.size, block_size=cfg.model.block_size))
    halves = [sum(math.prod(spec[n]) for n in names) for names in shard_names(spec, 2)]
    hubs = result["aggregators"]
    assert [(h["shard"], h["num_params"]) for h in hubs] == [(0, halves[0]), (1, halves[1])]
    assert result["num_params"] == sum(halves)
    # every round of each shard took both peers' halves (2 updates a round: too few for the statistical
    # checks to reject any), and each aggregator ingested its share only
    assert [(h["rounds_closed"], h["updates_accepted"]) for h in hubs] == [(3, 6), (3, 6)]
    ingest = [h["bytes_in"] for h in hubs]
    assert all(0.3 < b / sum(ingest) < 0.7 for b in ingest), ingest
    assert all(p["accepted"] == 3 and p["rejected"] == 0 for p in result["peers"])
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=15, what="the swarm's daemons to exit")


def test_killing_an_aggregator_without_a_standby_is_refused_in_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "potluck", "swarm", "--kill-aggregator-at", "2", "--json"]

    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert done.returncode == 2 and done.stdout == ""
    assert "--kill-aggregator-at needs --standby" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def _strike_out(join: str, *, offender: Identity, strikes: int) -> list[str]:
    """One good update (only a member's refusals are strikes), then `strikes` more in the same round, to the
    aggregator at `join`; the reasons it gave for each ('' when it took the update)."""
    node = await start_node(initial_peers=[join])
    try:
        link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
        state, state_payload, _ = await link.fetch_state(generate_identity().public_key)
        good, payload = signed_test_update(state, state_payload, sender=offender, tokens=2048)
        receipt, _ = await link.submit(good, payload)
        reasons = [receipt.receipt.reason]
        for _ in range(strikes):
            wrong = sign_update(dataclasses.replace(good.header, codec="int8", nonce=new_nonce()), offender)
            receipt, _ = await link.submit(wrong, payload)
            reasons.append(receipt.receipt.reason)
        return reasons
    finally:
        await node.shutdown()


async def _submit_good(join: str, *, sender: Identity) -> str:
    """A well-formed update from `sender` to the aggregator at `join`; the reason it was refused ('' if not)."""
    node = await start_node(initial_peers=[join])
    try:
        link = AggregatorLink(node.p2p, peer_id_of(parse_join_address(join)))
        state, state_payload, _ = await link.fetch_state(generate_identity().public_key)
        receipt, _ = await link.submit(*signed_test_update(state, state_payload, sender=sender, tokens=2048))
        return receipt.receipt.reason
    finally:
        await node.shutdown()


@pytest.mark.timeout(300)
def test_a_key_banned_by_one_shards_aggregator_is_refused_by_the_other(nodes: Nodes, tmp_path: Path) -> None:
    # Prepare: a run of two shards, each with its aggregator
    keys = [tmp_path / "shard-0.key", tmp_path / "shard-1.key"]
    listed = [public_key_to_hex(load_or_create_identity(k)[0].public_key) for k in keys]
    cfg = RunConfig().with_overrides(
        {"shards": 2, "aggregator_keys": listed, "round_deadline_s": 300, "data.max_bytes": 400_000}, source="test"
    )
    config = tmp_path / "run.toml"
    config.write_text(dump_run_config(cfg))
    common = ["aggregator", "--config", str(config), "--host", "127.0.0.1", "--http-port", "0"]
    first = nodes.start("shard-0", *common, "--identity", str(keys[0]), "--state-dir", str(tmp_path / "s0"))
    join_0 = first.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    second = nodes.start(
        "shard-1", *common, "--identity", str(keys[1]), "--state-dir", str(tmp_path / "s1"), "--join", join_0
    )
    join_1 = second.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    offender = generate_identity()
    # Execute: a member of the run takes three strikes on shard 0, which bans it there (ban_after_rejections = 3)
    reasons = asyncio.run(asyncio.wait_for(_strike_out(join_0, offender=offender, strikes=3), 60))
    # Assert: shard 1's aggregator learns the ban from the DHT and refuses the key's good update
    assert [r.split(":")[0] for r in reasons] == ["", "duplicate", "duplicate", "duplicate"]
    learned = second.next_event(lambda e: e.get("event") == "banned", timeout_s=60)
    assert learned["fingerprint"] == offender.fingerprint and learned["reason"].startswith("run-wide, by aggregator")
    refused = asyncio.run(asyncio.wait_for(_submit_good(join_1, sender=offender), 60))
    assert refused.startswith("banned: ")
