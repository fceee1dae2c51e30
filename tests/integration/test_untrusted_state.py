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


@pytest.mark.timeout(240)
def test_a_joiner_takes_the_state_from_several_holders_and_never_asks_a_stranger_claiming_one(nodes: Nodes) -> None:
    # Prepare: one honest peer that holds the state, slowed so that each round lasts most of its 10 s deadline
    # (the joiner arrives mid-round), and a forger that claims the same version (it would serve garbage). The
    # aggregator caps its state uploads (~16 s for the whole state) so that the holders, found on the DHT while
    # it already sends, have chunks left to give on a link as fast as loopback.
    aggregator = nodes.aggregator(rounds=40, round_deadline_s=10, extra=("--state-upload-rate", "1mbit"), **FAST)
    ready = aggregator.next_event(_is("ready"), timeout_s=90)
    real = ready["maddrs"][0]
    holder = nodes.peer("holder", real, "--speed", "0.01")
    holder_fp = holder.next_event(_is("synced"), timeout_s=90)["fingerprint"]
    forger = nodes.start("forger", "--join", real, "--tamper", "chunks", module="tests.integration.forger")
    forger.next_event(_is("ready"), timeout_s=90)
    held = holder.next_event(_is("round"), timeout_s=120)["round"] + 1  # the version it holds from now on
    forger.next_event(lambda e: e.get("event") == "claimed" and e["version"] == held, timeout_s=30)
    # Execute: a joiner arrives while round `held` is open
    joiner = nodes.peer("joiner", real, "--max-rounds", "1")
    # Assert
    synced = joiner.next_event(_is("synced"), timeout_s=90)
    sources = synced["state_sources"]
    # the forger's record is not believed (its key was credited in no round), so it is never asked
    assert set(sources) == {holder_fp, ready["fingerprint"]}, sources
    assert sources[holder_fp] > 0 and sources[ready["fingerprint"]] > 0, sources  # two sources gave chunks
    first_round = joiner.next_event(_is("round"), timeout_s=120)
    assert first_round["accepted"], first_round["reason"]
    assert joiner.wait_exit(timeout_s=60) == 0
    # the holder counts what it gave (its status page shows it): its next round event carries the total
    served = holder.next_event(lambda e: e.get("event") == "round" and e["round"] >= held, timeout_s=60)
    # at least what was kept from it, at most each chunk once (an endgame copy may lose to the aggregator's)
    assert sources[holder_fp] <= served["state_bytes_served"] <= sum(sources.values())
