"""Joiners trust nothing unsigned: a tampered or wrongly signed state is refused and another source is tried.

A forger (tests/integration/forger.py, a real process on the same DHT) announces itself as an aggregator
of the run and serves the real state with a byte flipped, or re-signed under its own key. The joiner is
pointed at the forger, so the forger is its first choice.
"""

import pytest

from tests.integration.swarm_helpers import Nodes

pytestmark = [pytest.mark.network, pytest.mark.slow]

FAST = {"local_steps": 6, "inner__warmup_steps": 2, "inner__batch_size": 8, "data__max_bytes": 400_000}


def _is(kind: str):  # noqa: ANN202 - a predicate factory
    return lambda e: e.get("event") == kind


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tamper", ["payload", "resign"])
def test_a_joiner_refuses_a_forged_state_and_trains_from_the_real_aggregator(nodes: Nodes, tamper: str) -> None:
    # Prepare: the forger's state fetch makes the aggregator wait for one key that never submits: short deadline
    aggregator = nodes.aggregator(rounds=40, round_deadline_s=20, **FAST)
    real = aggregator.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    forger = nodes.start("forger", "--join", real, "--tamper", tamper, module="tests.integration.forger")
    forged = forger.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    # Execute
    joiner = nodes.peer("joiner", forged, "--max-rounds", "1")
    # Assert
    refused = joiner.next_event(_is("state-refused"), timeout_s=90)
    forger.next_event(_is("served"), timeout_s=5)  # the joiner did ask the forger first
    synced = joiner.next_event(_is("synced"), timeout_s=90)
    assert synced["aggregator"] != refused["aggregator"]
    first_round = joiner.next_event(_is("round"), timeout_s=120)
    assert first_round["accepted"], first_round["reason"]
    assert joiner.wait_exit(timeout_s=60) == 0
