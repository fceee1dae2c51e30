"""Where an aggregator starts: its place in the run (shard and role), and the master state it resumes from.

Both follow from the signed run config and the state directory alone: the position of this
aggregator's key among the run's `aggregator_keys` gives its shard and whether it owns it or stands
by for the key listed before it (protocol/shards.py); the checkpoint, if any, gives the round to
resume at, checked to fit the run's model and density ladder.
"""

from pathlib import Path

from potluck.aggregator_server.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from potluck.aggregator_server.master import MasterState, initial_master
from potluck.aggregator_server.setup import SetupError
from potluck.protocol.config import RunConfig
from potluck.protocol.density import density_problem, start_density
from potluck.protocol.identity import Identity, public_key_from_hex, public_key_to_hex
from potluck.protocol.shards import ShardError, keys_of_shard, shard_names, shard_of_key
from potluck.tasks import run_shapes


def place(cfg: RunConfig, identity: Identity) -> tuple[int, list[str], bytes | None]:
    """This aggregator's shard, the parameter names it owns, and the primary it stands by for (None: owner)."""
    model_shapes = run_shapes(cfg)
    try:  # the parameters this aggregator owns: all of them, or its shard's (protocol/shards.py)
        own = public_key_to_hex(identity.public_key)
        shard = 0 if cfg.shards == 1 else shard_of_key(cfg.aggregator_keys, own, cfg.shards)
        names = shard_names(model_shapes, cfg.shards)[shard]
    except ShardError as e:
        raise SetupError(f"run {cfg.run_name!r}: {e}") from e
    owners = keys_of_shard(cfg.aggregator_keys, shard, cfg.shards)
    # the key listed before this one for the same shard: the aggregator this one stands by for (None: owner)
    place = owners.index(own) if own in owners else 0
    return shard, list(names), public_key_from_hex(owners[place - 1]) if place > 0 else None


def resume(cfg: RunConfig, state_dir: Path, *, names: list[str]) -> tuple[MasterState, Checkpoint | None]:
    """The master state of the parameters `names` to start from (the checkpoint's, or the run's initial one).

    CheckpointError if the checkpoint is for another model or run; SetupError if the run has finished.
    """
    checkpoint = load_checkpoint(state_dir, config_hash=cfg.config_hash)
    if checkpoint is None:
        master = initial_master(cfg, names=names)
    else:
        shapes = run_shapes(cfg)
        if {n: tuple(t.shape) for n, t in checkpoint.params.items()} != {name: shapes[name] for name in names}:
            raise CheckpointError(
                f"the checkpoint in {state_dir} does not fit the run's model; use another --state-dir"
            )
        master = MasterState(
            round=checkpoint.round,
            version=checkpoint.version,
            params={name: checkpoint.params[name] for name in names},  # the model's order, not sorted
            outer_state=checkpoint.outer_state,
            residual=checkpoint.residual,
            density=start_density(cfg) if checkpoint.density is None else checkpoint.density,
        )
        problem = density_problem(cfg, master.density)
        if problem is not None:
            raise CheckpointError(f"the checkpoint in {state_dir} is for another run: {problem}")
    if master.round >= cfg.rounds:
        raise SetupError(
            f"run {cfg.run_name!r} in {state_dir} already finished ({cfg.rounds} rounds); "
            "use another --state-dir to start a new run"
        )
    return master, checkpoint
