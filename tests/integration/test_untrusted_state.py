"""Joiners trust nothing unsigned: a tampered or wrongly signed state is refused and another source is tried.

A forger (tests/integration/forger.py, a real process on the same DHT) announces itself as an aggregator
of the run and serves the real state with a byte flipped, or re-signed under its own key. A joiner pointed
at the forger takes no run from it (peer/trust.py): only one given the run's key joins the real run.
"""

import pytest

from potluck.protocol.identity import load_or_create_identity, public_key_to_hex
from tests.integration.swarm_helpers import Nodes

pytestmark = [pytest.mark.network, pytest.mark.slow]

FAST = {"local_steps": 6, "inner__warmup_steps": 2, "inner__batch_size": 8, "data__max_bytes": 400_000}


def _is(kind: str):  # noqa: ANN202 - a predicate factory
    return lambda e: e.get("event") == kind


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tamper", ["payload", "resign"])
def test_a_joiner_takes_no_run_from_a_forger_at_join_and_trains_with_the_runs_key(nodes: Nodes, tamper: str) -> None:
    # Prepare: the forger's state fetch makes the aggregator wait for one key that never submits: short deadline
    aggregator = nodes.aggregator(rounds=40, round_deadline_s=20, **FAST)
    real = aggregator.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    real_key, _ = load_or_create_identity(nodes.work_dir / "aggregator" / "identity.key")
    forger = nodes.start("forger", "--join", real, "--tamper", tamper, module="tests.integration.forger")
    forged = forger.next_event(_is("ready"), timeout_s=90)["maddrs"][0]
    # Execute: both join through the forger; one was given the run's key
    alone = nodes.peer("alone", forged, "--max-rounds", "1", "--reconnect-timeout", "10")
    keyed = nodes.peer(
        "keyed", forged, "--max-rounds", "1", "--aggregator-key", public_key_to_hex(real_key.public_key)
    )
    # Assert: without a key the forger's run is never trained (its state, signed by itself, is refused)
    assert alone.wait_exit(timeout_s=120) == 2
    assert not any(e.get("event") in ("synced", "round") for e in alone.all_events(timeout_s=10))
    synced = keyed.next_event(_is("synced"), timeout_s=90)
    assert synced["aggregator"] == real_key.fingerprint
    first_round = keyed.next_event(_is("round"), timeout_s=120)
    assert first_round["accepted"], first_round["reason"]
    assert keyed.wait_exit(timeout_s=60) == 0


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
    # the holder counts what it gave (its status page shows it): its event for the joiner's first round carries the
    # total (that round closed after the joiner's upload, so after its download; an event of round `held` may
    # still be unread and come from before the download)
    joined = first_round["round"]
    served = holder.next_event(lambda e: e.get("event") == "round" and e["round"] >= joined, timeout_s=60)
    # at least what was kept from it, at most each chunk once (an endgame copy may lose to the aggregator's)
    assert sources[holder_fp] <= served["state_bytes_served"] <= sum(sources.values())
