"""A copy of a shard's master state, kept in step with its aggregator's signed state and aggregates.

Peers keep one for every shard, and so does a standby aggregator for the shard it backs up: both start
from a state the shard's aggregator signed and then apply each signed aggregate with the run's outer
step, checking the result against the checksum the aggregator signed. Everything here is checked
before it is used; a copy that fails a check must be downloaded again (ReplicaError).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from potluck.errors import PotluckError
from potluck.protocol.codecs import CodecError
from potluck.protocol.config import RunConfig
from potluck.protocol.density import density_problem, round_codecs
from potluck.protocol.envelope import EnvelopeError, SignedAggregate, SignedState, StateHeader
from potluck.protocol.file_store import TOKENIZERS, store
from potluck.protocol.identity import public_key_to_hex
from potluck.protocol.messages import MessageError, decode_state_payload
from potluck.protocol.shards import ShardError, shard_names, shard_of_key
from potluck.training.diloco import OuterOptimizer, state_sha256


class ReplicaError(PotluckError):
    """A state or aggregate this copy cannot take (one line); download the state again, or from elsewhere."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardState:
    """A checked state of one shard, as its aggregator signed it."""

    cfg: RunConfig
    header: StateHeader
    shard: int
    params: dict[str, torch.Tensor]  # the shard's tensors, in the model's order
    outer: OuterOptimizer


def check_state(
    signed: SignedState, payload: bytes, *, source: bytes, shapes_of: Callable[[RunConfig], dict[str, tuple[int, ...]]]
) -> ShardState:
    """The state `source` (an aggregator key) served, once its signature, config, shard and checksum check out.

    `shapes_of(cfg)` is the run's model as this node builds it (potluck.tasks.run_shapes); it raises
    TaskMismatch, this node's own problem, when that build is not the architecture the run records.
    """
    try:
        signed.verify({source})
        signed.verify_payload(payload)
        cfg, params, outer_state, tokenizer = decode_state_payload(payload)
    except (EnvelopeError, MessageError) as e:
        raise ReplicaError(f"its state does not check out: {e}") from e
    h = signed.header
    if public_key_to_hex(source) not in cfg.aggregator_keys or h.config_hash != cfg.config_hash:
        raise ReplicaError("it serves a config that does not trust it or does not match its signed hash")
    shapes = shapes_of(cfg)
    try:
        shard = shard_of_key(cfg.aggregator_keys, public_key_to_hex(source), cfg.shards)
        names = shard_names(shapes, cfg.shards)[shard]
    except ShardError as e:
        raise ReplicaError(f"its run config cannot be sharded as it says: {e}") from e
    if h.shard != shard:
        raise ReplicaError(f"its state says it is shard {h.shard}, but its key owns shard {shard}")
    if {n: tuple(t.shape) for n, t in params.items()} != {n: shapes[n] for n in names}:
        raise ReplicaError("its state does not match its shard of the model")
    if state_sha256(params) != h.state_sha256:
        raise ReplicaError("its state does not match its signed checksum")
    problem = density_problem(cfg, h.density)
    if problem is not None:
        raise ReplicaError(f"its state announces a {problem}")
    if tokenizer is not None:
        store(TOKENIZERS, tokenizer)  # checked against the config's hash: where this node's task reads it
    outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
    outer.load_state_dict(outer_state)
    return ShardState(cfg=cfg, header=h, shard=shard, params={name: params[name] for name in names}, outer=outer)


def apply_aggregate(
    signed: SignedAggregate,
    payload: bytes,
    *,
    cfg: RunConfig,
    source: bytes,
    round_index: int,
    density: float,
    params: dict[str, torch.Tensor],
    outer: OuterOptimizer,
) -> None:
    """Apply round `round_index`'s aggregate, signed by `source`, to a shard's `params` (in place) with `outer`.

    `density` is the round's upload density, which sets the aggregate's codec. ReplicaError, with the
    parameters untouched, when the aggregate is not the one expected; ReplicaError after the step when the
    result's checksum differs from the signed one (the copy has drifted: download the state again).
    """
    h = signed.header
    _, aggregate_codec = round_codecs(cfg, density)
    try:
        signed.verify({source})
        signed.verify_payload(payload)
        if h.round != round_index or h.codec != aggregate_codec.name:
            raise EnvelopeError(f"aggregate is for round {h.round} with codec {h.codec}, expected {round_index}")
        problem = density_problem(cfg, h.next_density)
        if problem is not None:
            raise EnvelopeError(f"aggregate announces a {problem}")
        applied = aggregate_codec.decode(payload, {name: tuple(t.shape) for name, t in params.items()})
    except (EnvelopeError, CodecError) as e:
        raise ReplicaError(f"aggregate refused ({e})") from e
    outer.step(params, applied)
    if state_sha256(params) != h.state_sha256:
        raise ReplicaError(f"round {h.round}: state checksum differs from the aggregator's")
