"""Which shard an aggregator serves, and whether it owns it or stands by, follow from the signed config alone."""

from pathlib import Path

import pytest

from potluck.aggregator_server.setup import SetupError
from potluck.protocol.identity import generate_identity, public_key_to_hex
from tests.aggregator_server.in_process import AGGREGATOR, make_server

OWN = public_key_to_hex(AGGREGATOR.public_key)
OTHERS = [public_key_to_hex(generate_identity().public_key) for _ in range(3)]


@pytest.mark.parametrize(
    ("keys", "shards", "shard", "standby_of"),
    [
        ([OWN], 1, 0, None),
        ([OTHERS[0], OWN], 1, 0, OTHERS[0]),  # listed second for the one shard: the first's standby
        ([OTHERS[0], OWN], 2, 1, None),  # two shards: it owns the second
        ([OTHERS[0], OTHERS[1], OTHERS[2], OWN], 2, 1, OTHERS[1]),  # the second shard's standby
    ],
    ids=["alone", "standby", "second-shard", "second-shards-standby"],  # the keys are random: not in the ids
)
def test_the_key_position_sets_shard_and_role(
    tmp_path: Path, keys: list[str], shards: int, shard: int, standby_of: str | None
) -> None:
    server = make_server(tmp_path, aggregator_keys=keys, shards=shards)
    server.ledger.close()

    assert server.shard == shard
    assert (None if server.primary is None else public_key_to_hex(server.primary)) == standby_of
    assert sum(t.numel() for t in server.master.params.values()) < 254_592 or shards == 1


def test_a_sharded_run_that_does_not_list_this_key_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="is not among the run's aggregator_keys"):
        make_server(tmp_path, aggregator_keys=OTHERS[:2], shards=2)
