"""How a volunteer runs (the plain options record the CLI fills), and the ways its run stops."""

from dataclasses import dataclass
from pathlib import Path

import torch

from potluck.errors import DIVERGED_EXIT_STATUS, PotluckError


class PeerError(PotluckError):
    """The peer cannot go on (one line, with the fix)."""


class PeerDiverged(PeerError):
    """The peer's local training went non-finite: nothing it could send would be of use (one line)."""

    exit_status = DIVERGED_EXIT_STATUS


class RunFinished(PotluckError):
    """The aggregator says the run is over: leave cleanly."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerOptions:
    """How this volunteer runs (the run itself comes from the aggregator's state)."""

    join: tuple[str, ...]
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    client_mode: bool = False
    run: str | None = None  # which run to join when the DHT carries several
    # The run's aggregator keys (hex) given with --aggregator-key: trusted instead of asking the --join node
    aggregator_keys: tuple[str, ...] = ()
    # Where the run's aggregator keys are pinned at first join and trusted on restart (None: nothing pinned)
    trust_file: Path | None = None
    # Where the inner optimizer's state is kept between rounds, for a restart to take back (None: not kept)
    inner_state_file: Path | None = None
    data: str | None = None  # this peer's own text (None: the run's data)
    tokenizer: str | None = None  # the sha256 of the tokenizer.json this volunteer brought: the run's must match
    device: torch.device = torch.device("cpu")
    batch_size: int | None = None
    max_rounds: int | None = None
    reconnect_timeout_s: float = 300.0
    join_timeout_s: float = 30.0
    receipts_dir: Path | None = None  # where final receipts are kept (None: checked, not kept)
    # Train on while an update is in flight (one-round-delayed outer updates). Off by default: at equal wall
    # time it measured within 1% but no better: +0.02% on a GPU, +0.5-0.6% on a 2-core CPU box
    # (docs/experiments/overlap.md).
    overlap: bool = False
    # With overlap, at most this share of a round's inner steps run before its base arrives; then training
    # waits for it (1: no limit). Updates whose steps were all stale fail the held-out check now and then:
    # after one such drop the peer lowers its limit to SAFE_OVERLAP_LIMIT for the rest of the run.
    overlap_limit: float = 1.0
    speed: float = 1.0  # testing aid: below 1, every inner step lasts 1/speed as long
    # Fitting a small GPU: each inner step's batch goes through the model this many sequences at a time
    # (gradient accumulation; None: all at once), and activations are recomputed in the backward pass.
    micro_batch: int | None = None
    checkpointing: bool = False
    # At start-up, after the state: time a few inner steps, probe the link to the aggregator and log the
    # scaling efficiency the run's settings give here (potluck.planning.plan.auto_plan) for `plan_peers` peers.
    plan: bool = False
    plan_peers: int = 8
    # Score the master state on this many of the run's held-out batches after each round (0: never). An
    # aggregator scores the rounds it closes; in a sharded run none holds the whole model, so a peer may.
    eval_batches: int = 0
    # Serve chunks of the state this peer holds to joiners (state from many sources), and say so on the DHT.
    # A peer in client mode cannot be dialled, so it never serves.
    serve_state: bool = True
