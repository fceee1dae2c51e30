"""The peer's own records: its copy of the master state, shard by shard, and the counters its summary reports."""

import asyncio
import logging
from dataclasses import dataclass

import torch

from potluck.protocol.client import AggregatorLink
from potluck.protocol.config import RunConfig
from potluck.protocol.dht_schema import AggregatorAnnouncement
from potluck.protocol.envelope import SignedAggregate
from potluck.tasks.held_out import HeldOutLoss
from potluck.training.diloco import OuterOptimizer
from potluck.training.replica import ReplicaError, apply_aggregate

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Shard:
    """One shard of the run as this peer follows it: its aggregator, its tensors, its outer step and density."""

    index: int
    names: tuple[str, ...]
    announcement: AggregatorAnnouncement
    link: AggregatorLink
    version: int  # aggregates of this shard applied so far
    outer: OuterOptimizer
    density: float  # the open round's upload density (protocol/density.py)
    contributors: int = 0  # how many the aggregate that made `version` lists; 0 for a downloaded state

    @property
    def key(self) -> bytes:
        """The public key of the aggregator this peer follows the shard with."""
        return self.announcement.public_key


@dataclass(kw_only=True, slots=True)
class Master:
    """This peer's copy of the master state: the same parameters and outer momentum as the aggregators hold."""

    cfg: RunConfig
    round: int
    params: dict[str, torch.Tensor]  # the whole model, every shard's tensors
    shards: list[Shard]  # one in a run that is not sharded


@dataclass(kw_only=True, slots=True)
class Tally:
    """What this peer did so far: the figures of its last status line and of `potluck swarm`."""

    rounds_done: int = 0
    accepted: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    chunks_served_bytes: int = 0  # chunks of the state given to joiners (also in bytes_up)
    receipts: int = 0  # final receipts of accepted updates that verified
    score: float = 0.0  # points they credit


def apply_shard_aggregate(master: Master, shard: Shard, signed: SignedAggregate, payload: bytes) -> bool:
    """Verify and apply one shard's aggregate to the peer's master copy; False when it must resync instead.

    The master's round moves on once every shard's aggregate is applied (the caller's job).
    """
    try:
        apply_aggregate(
            signed,
            payload,
            cfg=master.cfg,
            source=shard.key,
            round_index=master.round,
            density=shard.density,
            params={name: master.params[name] for name in shard.names},  # the same tensors: stepped in place
            outer=shard.outer,
        )
    except ReplicaError as e:
        logger.warning("round %d: %s; downloading the state again", master.round, e)
        return False
    shard.version = signed.header.new_version
    shard.contributors = len(signed.header.contributors)
    shard.density = signed.header.next_density
    return True


class HeldOutScore:
    """The master state's held-out loss on `batches` of the run's held-out batches; None when batches is 0."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self._loss: HeldOutLoss | None = None  # built on first use: the run's config comes with its state

    async def __call__(self, cfg: RunConfig, params: dict[str, torch.Tensor]) -> float | None:
        """Score `params` in a worker thread (PeerOptions.eval_batches)."""
        if self.batches <= 0:
            return None
        if self._loss is None:
            self._loss = HeldOutLoss(cfg, batches=self.batches)
        return await asyncio.to_thread(self._loss, params)
