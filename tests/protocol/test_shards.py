"""The shard layout: every peer and aggregator must cut the model the same way, in order, about evenly."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from potluck.protocol.config import ConfigError, RunConfig
from potluck.protocol.config_files import run_config_from_mapping
from potluck.protocol.shards import ShardError, keys_of_shard, shard_names, shard_of_key
from potluck.training.models import model_config, parameter_shapes

KEYS = tuple(f"{i:02x}" * 32 for i in range(5))


def _sizes(spec: dict[str, tuple[int, ...]], groups) -> list[int]:  # noqa: ANN001
    return [sum(math.prod(spec[n]) for n in g) for g in groups]


def test_one_shard_is_the_whole_model_in_its_order() -> None:
    spec = parameter_shapes(model_config("tiny", block_size=64))
    assert shard_names(spec, 1) == (tuple(spec),)


def test_the_tiny_model_splits_in_two_about_evenly() -> None:
    spec = parameter_shapes(model_config("tiny", block_size=64))
    first, second = shard_names(spec, 2)
    assert first + second == tuple(spec)
    sizes = _sizes(spec, (first, second))
    assert abs(sizes[0] - sizes[1]) <= max(math.prod(s) for s in spec.values())


@given(
    shapes=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)), min_size=1, max_size=30),
    count=st.integers(1, 30),
)
def test_shards_partition_the_tensors_in_order_and_stay_near_the_even_share(shapes, count) -> None:  # noqa: ANN001
    spec = {f"t{i}": shape for i, shape in enumerate(shapes)}
    if count > len(spec):
        with pytest.raises(ShardError, match="too few"):
            shard_names(spec, count)
        return
    groups = shard_names(spec, count)
    assert len(groups) == count and all(groups)
    assert sum(groups, ()) == tuple(spec)
    total, largest = sum(math.prod(s) for s in shapes), max(math.prod(s) for s in shapes)
    # each cut lands at the first boundary past an even share, or earlier to leave a tensor per shard
    assert all(size <= total / count + largest for size in _sizes(spec, groups))


def test_keys_own_shards_by_their_position_and_later_keys_are_standbys() -> None:
    assert [shard_of_key(KEYS, k, 2) for k in KEYS] == [0, 1, 0, 1, 0]
    assert keys_of_shard(KEYS, 1, 2) == (KEYS[1], KEYS[3])
    with pytest.raises(ShardError, match="not among"):
        shard_of_key(KEYS[:2], KEYS[4], 2)


def test_a_sharded_config_needs_a_key_per_shard() -> None:
    assert RunConfig(shards=2, aggregator_keys=KEYS[:2]).shards == 2
    assert RunConfig(shards=3).aggregator_keys == ()  # no key at all: no aggregator, nothing to own
    with pytest.raises(ConfigError, match="3 shards need at least 3 aggregator_keys"):
        run_config_from_mapping({"shards": 3, "aggregator_keys": list(KEYS[:2])}, source="run.toml")
