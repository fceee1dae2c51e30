"""Which aggregator owns which parameters: the run's parameter vector cut into contiguous shards.

One aggregator's download link and CPU bound how many peers it can serve. With ``RunConfig.shards``
set to S > 1, the model's tensors, in the model's order, are cut at tensor boundaries into S
contiguous groups of about equal size; each group is a shard with an aggregator of its own. A peer
encodes, signs and uploads each shard to its owner and applies each shard's aggregate to those
parameters only, so each aggregator ingests about 1/S of every upload.

Ownership is in the signed config, not in the DHT: the aggregator listed k-th in
``aggregator_keys`` owns shard ``k % S``, so nobody can claim a shard by announcing it, and keys
listed after the first S are standbys for the same shards. Everything here is pure and
deterministic, so every peer and aggregator cuts the model the same way.
"""

from collections.abc import Mapping, Sequence

from potluck.errors import PotluckError

TensorSpec = Mapping[str, tuple[int, ...]]


class ShardError(PotluckError, ValueError):
    """A shard layout that cannot work for this model or these keys (one line, with the fix)."""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_names(spec: TensorSpec, count: int) -> tuple[tuple[str, ...], ...]:
    """The model's tensor names cut, in order, into `count` contiguous non-empty groups of about equal size.

    Cut s goes at the tensor boundary nearest to s/count of the parameters, after the cut before it and
    leaving a tensor for each shard after it. ShardError when the model has fewer tensors than shards.
    """
    names = list(spec)
    if count < 1:
        raise ShardError(f"a run needs at least one shard, got {count}")
    if count > len(names):
        raise ShardError(f"the model has {len(names)} tensors, too few for {count} shards; use at most {len(names)}")
    before = [0]  # before[b]: parameters in the first b tensors
    for name in names:
        before.append(before[-1] + _numel(spec[name]))
    cuts = [0]
    for s in range(1, count):
        target = s * before[-1] / count
        allowed = range(cuts[-1] + 1, len(names) - (count - s) + 1)
        cuts.append(min(allowed, key=lambda b: (abs(before[b] - target), b)))
    cuts.append(len(names))
    return tuple(tuple(names[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))


def shard_of_key(aggregator_keys: Sequence[str], public_key_hex: str, count: int) -> int:
    """The shard an aggregator owns: its position in the run's `aggregator_keys`, modulo the shard count."""
    try:
        return aggregator_keys.index(public_key_hex) % count
    except ValueError:
        raise ShardError(f"key {public_key_hex[:16]}... is not among the run's aggregator_keys") from None


def keys_of_shard(aggregator_keys: Sequence[str], shard: int, count: int) -> tuple[str, ...]:
    """The keys that serve `shard`: its owner first, then any standbys, in config order."""
    return tuple(k for i, k in enumerate(aggregator_keys) if i % count == shard)


def check_shard_keys(aggregator_keys: Sequence[str], count: int) -> None:
    """ShardError unless every shard has an aggregator key (a run with no keys at all has no aggregator)."""
    if aggregator_keys and len(aggregator_keys) < count:
        raise ShardError(
            f"{count} shards need at least {count} aggregator_keys, one per shard; the config lists "
            f"{len(aggregator_keys)}"
        )
