"""The load generator's smallest setting (bench/load.py): five identities, two rounds, against a real aggregator."""

from pathlib import Path

import pytest

from bench.load import parser, run_load
from potluck.lab.children import Child
from tests.integration.swarm_helpers import alive_in_groups

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.mark.timeout(150)
def test_five_identities_are_accepted_and_credited_every_round_and_nothing_is_left_running(tmp_path: Path) -> None:
    # Arrange
    argv = ["--identities", "5", "--rounds", "2", "--workers", "1", "--deadline", "60", "--no-dht"]
    args = parser().parse_args([*argv, "--worker-nice", "0", "--timeout", "130", "--work-dir", str(tmp_path)])
    children: list[Child] = []
    lines: list[str] = []

    # Act
    result = run_load(args, 5, on_line=lines.append, children=children)

    # Assert: a warm-up and two measured rounds, each closed once all five reported, every update credited
    rounds = result["rounds"]
    assert [r["warmup"] for r in rounds] == [True, False, False]
    assert all(r["accepted"] == 5 and r["credited"] == 5 and r["closed_by"] == "all-reported" for r in rounds)
    assert all(r["rss_mb"] and r["submit_p99_s"] is not None for r in rounds[1:])
    assert result["summary"]["refusals"] == 0 and len(lines) == 3
    assert len(children) == 2 and not alive_in_groups({child.process.pid for child in children})
