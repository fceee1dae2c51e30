"""Which run a state directory serves: the config file given, or the one stored there on first start.

A run's identity is its config hash, and the hash covers the trusted aggregator keys, so the first
start writes the run's config (with this aggregator's key added when the file named none) to
`<state-dir>/run.toml`. Later starts read it back; a different `--config` on the same directory is
refused rather than silently starting another run on top of the old checkpoints.
"""

import logging
from pathlib import Path

from potluck.errors import PotluckError
from potluck.protocol.config import ConfigError, RunConfig
from potluck.protocol.config_files import dump_run_config, load_run_config
from potluck.protocol.identity import Identity, public_key_to_hex
from potluck.tasks import created

logger = logging.getLogger(__name__)

RUN_FILE = "run.toml"


class SetupError(PotluckError):
    """The state directory and the given config disagree (one line, with the fix)."""


def with_own_key(cfg: RunConfig, identity: Identity) -> RunConfig:
    """The config with this aggregator's key trusted: added when the config names none, refused when left out."""
    own = public_key_to_hex(identity.public_key)
    if not cfg.aggregator_keys:
        return cfg.with_overrides({"aggregator_keys": [own]})
    if own not in cfg.aggregator_keys:
        raise SetupError(
            f"this aggregator's key {identity.fingerprint} is not among the config's aggregator_keys; add {own} "
            "to aggregator_keys or start with the identity the run was made for"
        )
    return cfg


def prepare_run(*, state_dir: Path, config: RunConfig | None, identity: Identity) -> RunConfig:
    """The run to serve from `state_dir`, writing `run.toml` on first start; SetupError on a mismatch."""
    stored_path = state_dir / RUN_FILE
    stored = None
    if stored_path.exists():
        try:
            stored = load_run_config(stored_path)
        except ConfigError as e:
            raise SetupError(f"{e}; fix or delete {stored_path} (it names the run this directory serves)") from e
    if config is None:
        if stored is not None:
            if public_key_to_hex(identity.public_key) not in stored.aggregator_keys:
                raise SetupError(
                    f"{stored_path} names a run that does not trust this aggregator's key {identity.fingerprint}; "
                    "start with the identity this run was made for (--identity), or use another --state-dir"
                )
            return stored
        config = RunConfig()
    wanted = created(with_own_key(config, identity))  # with its task's architecture fingerprint
    if stored is not None:
        if stored.config_hash != wanted.config_hash:
            raise SetupError(
                f"{state_dir} holds run {stored.run_name!r} (config {stored.config_hash[:12]}), not the given config "
                f"({wanted.config_hash[:12]}); leave out --config to resume it, or use another --state-dir"
            )
        return stored
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = stored_path.with_name(RUN_FILE + ".tmp")
    tmp.write_text(dump_run_config(wanted, "toml"))
    tmp.replace(stored_path)
    logger.info("new run %r (config %s) in %s", wanted.run_name, wanted.config_hash[:12], state_dir)
    return wanted
