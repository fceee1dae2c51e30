"""The master state an aggregator owns, and the step that closes a round on it.

`close_round` is the arithmetic of DESIGN.md's steps 6-7 without any I/O: the run's aggregation
rule (token-weighted mean, trimmed mean or CenteredClip; see judge.py) over the judged updates,
re-encoded with the aggregator's error feedback, decoded again exactly as peers will decode it,
the outer optimizer step, and the signed aggregate. It
returns a new state and leaves the old one untouched, so the server can checkpoint the result and
only then make it current: a failed checkpoint loses nothing.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potluck.incentives.ledger_format import GENESIS_HASH
from potluck.incentives.merkle import merkle_root
from potluck.protocol.codecs import Codec, encode_aggregate
from potluck.protocol.config import RunConfig
from potluck.protocol.density import start_density
from potluck.protocol.envelope import AggregateHeader, SignedAggregate, payload_digest, sign_aggregate
from potluck.protocol.identity import Identity
from potluck.tasks import initial_model, run_task
from potluck.training.combine import combine
from potluck.training.diloco import OuterOptimizer, snapshot, state_sha256


@dataclass(frozen=True, kw_only=True, slots=True)
class MasterState:
    """Everything needed to close the next round; never mutated in place once built."""

    round: int  # the open round
    version: int  # aggregates applied so far
    params: dict[str, torch.Tensor]  # fp32, CPU
    outer_state: dict[str, torch.Tensor]  # outer momentum buffers
    residual: dict[str, torch.Tensor]  # the aggregator's error feedback for the download codec
    density: float = 0.0  # the open round's upload density (protocol/density.py); 0.0: the codec has none

    @property
    def spec(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes: what every update must decode to."""
        return {name: tuple(t.shape) for name, t in self.params.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class Contribution:
    """One accepted update as the aggregation sees it."""

    public_key: bytes
    decoded: dict[str, torch.Tensor]
    tokens: int  # tokens credited (already capped)
    update_digest: bytes  # UpdateHeader.digest(): the update's leaf in the aggregate's Merkle root


def initial_master(cfg: RunConfig, *, names: Sequence[str] | None = None) -> MasterState:
    """Round 0: the run's model, its seed's or init_from's weights (the tensors in `names`: a shard), no momentum."""
    model = initial_model(cfg, run_task(cfg))
    params = snapshot(model, device="cpu")
    if names is not None:
        params = {name: params[name] for name in names}
    return MasterState(round=0, version=0, params=params, outer_state={}, residual={}, density=start_density(cfg))


def token_cap(cfg: RunConfig) -> int:
    """Most work (tokens) one peer can do in a round under the run's config: the cap on its weight and credit."""
    return cfg.local_steps * run_task(cfg).most_work(batch_size=cfg.inner.batch_size)


def close_round(
    master: MasterState,
    contributions: Sequence[Contribution],
    *,
    cfg: RunConfig,
    identity: Identity,
    aggregate_codec: Codec,
    ledger_head: bytes = GENESIS_HASH,
    next_density: float | None = None,
) -> tuple[MasterState, SignedAggregate, bytes]:
    """(next state, signed aggregate, aggregate payload) for the open round; `master` is left as it was.

    The aggregate commits to the contributions' update digests (a Merkle root) and to `ledger_head`,
    the ledger's chain head once this round's rows are in it (GENESIS_HASH: no ledger), and announces
    the next round's upload density (None: this round's).
    """
    next_density = master.density if next_density is None else next_density
    if not contributions:
        raise ValueError(f"round {master.round} has no contribution to aggregate")
    ordered = sorted(contributions, key=lambda c: c.public_key)  # a fixed order: the mean is reproducible
    mean = combine([c.decoded for c in ordered], [float(c.tokens) for c in ordered], spec=cfg.aggregation)
    residual = {name: t.clone() for name, t in master.residual.items()}
    payload = encode_aggregate(mean, codec=aggregate_codec, state=residual)
    applied = aggregate_codec.decode(payload, master.spec)  # what every peer applies, bit for bit
    params = {name: t.clone() for name, t in master.params.items()}
    outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
    outer.load_state_dict(master.outer_state)
    outer.step(params, applied)
    header = AggregateHeader(
        run_id=cfg.run_name,
        config_hash=cfg.config_hash,
        round=master.round,
        new_version=master.version + 1,
        aggregator_public_key=identity.public_key,
        codec=aggregate_codec.name,
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        state_sha256=state_sha256(params),
        contributors=tuple((c.public_key, c.tokens) for c in ordered),
        timestamp_s=time.time(),
        updates_root=merkle_root([c.update_digest for c in ordered]),
        ledger_head=ledger_head,
        next_density=next_density,
    )
    following = MasterState(
        round=master.round + 1,
        version=master.version + 1,
        params=params,
        outer_state=outer.state_dict(),
        residual=residual,
        density=next_density,
    )
    return following, sign_aggregate(header, identity), payload
