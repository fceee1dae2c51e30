"""Sharded aggregators as users run them: `potluck swarm --aggregators 2` cuts the model in two, each half
with an aggregator process of its own; every peer uploads each half to its owner and applies both aggregates
(real processes, real DHT, real libp2p streams)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from potluck.protocol.config import RunConfig
from potluck.protocol.shards import shard_names
from potluck.training.models import model_config, parameter_shapes
from tests.integration.swarm_helpers import p2pd_pids, wait_until

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
