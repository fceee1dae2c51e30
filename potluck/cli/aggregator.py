"""`potluck aggregator` (and the `aggregator-server` script): serve a run until its last round, Ctrl-C or SIGTERM.

Its flags are `AggregatorFlags`, declared once: `potluck aggregator` parses them and `potluck swarm` renders
them for the aggregators it starts.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator

from potluck.cli.common import DEFAULT_HTTP_PORT, DEFAULT_STATE_DIR, UsageError
from potluck.cli.flags import Flags, flag, takes
from potluck.cli.process import node_identity, prepare_node_process, run_until_stopped
from potluck.cli.status_lines import describe_aggregator_event, printer
from potluck.lab.netlab import parse_rate

if TYPE_CHECKING:
    from potluck.aggregator_server.server import AggregatorServer
    from potluck.events import Event
    from potluck.protocol.config import RunConfig
    from potluck.tasks import Task


class AggregatorFlags(Flags):
    """What an aggregator takes (`potluck aggregator`, and each aggregator `potluck swarm` starts)."""

    config: Annotated[
        Path | None, flag("--config", "-c", help="Run config (TOML/YAML). [default: the embedded tiny run]")
    ] = None
    state_dir: Annotated[
        Path, flag("--state-dir", help="Durable state: keys, run.toml, checkpoints, spool.")
    ] = DEFAULT_STATE_DIR
    task: Annotated[
        str | None,
        flag(
            "--task",
            help="Train a task of your own: package.module:attribute, imported from this Python installation "
            "(sets the new run's task.name; volunteers pass the same flag).",
        ),
    ] = None
    identity: Annotated[
        Path | None,
        flag("--identity", "-i", help="Ed25519 key, created on first run. [default: STATE_DIR/identity.key]"),
    ] = None
    host: Annotated[str, flag("--host", help="Address to listen on (0.0.0.0: every interface).")] = "0.0.0.0"
    port: Annotated[
        int,
        Field(ge=0, le=65535),
        flag("--port", help="TCP port to listen on; fix it so peers can rejoin after a restart (0: any)."),
    ] = 0
    announce: Annotated[
        tuple[str, ...], flag("--announce", help="Multiaddr peers should dial (e.g. your public IP); repeatable.")
    ] = ()
    join: Annotated[
        tuple[str, ...], flag("--join", help="Another node's multiaddr to bootstrap the DHT from; repeatable.")
    ] = ()
    multiaddr_file: Annotated[
        Path | None, flag("--multiaddr-file", help="Write the full multiaddrs here, one a line, once ready.")
    ] = None
    max_rounds: Annotated[
        int | None, Field(ge=1), flag("--max-rounds", help="Leave after closing this many rounds.")
    ] = None
    wait_for_peers: Annotated[
        int,
        Field(ge=0),
        flag(
            "--wait-for-peers",
            help="Start together: hold the state (up to 60 s) and the first round (up to 3 deadlines) "
            "until N peers have joined.",
        ),
    ] = 0
    failover_after: Annotated[
        float,
        Field(ge=1),
        flag(
            "--failover-after",
            help="For a standby (a key listed after its shard's owner in aggregator_keys): take the shard over "
            "once the owner has not answered, nor re-announced itself on the DHT, for this many seconds.",
        ),
    ] = 20.0
    state_upload_rate: Annotated[
        str | None,
        flag(
            "--state-upload-rate",
            help="Cap what this aggregator sends joiners as state chunks, e.g. 20mbit: joiners then take more "
            "from the peers that hold the state, and rounds keep the rest of the link. [default: no cap]",
        ),
    ] = None
    max_connections: Annotated[
        int,
        Field(ge=64),
        flag(
            "--max-connections",
            help="libp2p connections to keep: every volunteer holds one (~1 MB each); above this the oldest "
            "are closed, with their streams, and redial. Set it above the run's volunteers.",
        ),
    ] = 4096
    set_: Annotated[
        tuple[str, ...], flag("--set", help="Override one config field, e.g. --set local_steps=20; repeatable.")
    ] = ()
    threads: Annotated[
        int | None, Field(ge=1), flag("--threads", help="CPU threads for torch. [default: torch's]")
    ] = None
    http_port: Annotated[
        int | None,
        Field(ge=0, le=65535),
        flag("--http-port", help="Status page, JSON API and /metrics port (0: none). [default: 8000]"),
    ] = None
    http_host: Annotated[
        str, flag("--http-host", help="Status page address (0.0.0.0: every interface).")
    ] = "127.0.0.1"
    http_per_address: Annotated[
        int | None,
        Field(ge=1),
        flag(
            "--http-per-address",
            help="Status page connections one remote address may hold open, so one cannot take all 256; raise it "
            "behind a reverse proxy, where every browser has the proxy's address. [default: 32]",
        ),
    ] = None
    admin_token_file: Annotated[
        Path | None,
        flag("--admin-token-file", help="File holding the bearer token that enables the admin endpoints."),
    ] = None
    as_json: Annotated[bool, flag("--json", help="One JSON object per event on stdout.")] = False

    @field_validator("state_upload_rate")
    @classmethod
    def _reads_as_a_rate(cls, text: str | None) -> str | None:
        if text is not None:
            _rate_bytes(text)
        return text

    def command(self) -> list[str]:
        """`aggregator` and its flags: what `python -m potluck` runs as this aggregator."""
        return ["aggregator", *self.argv()]


def _rate_bytes(text: str) -> float:
    """`--state-upload-rate` in bytes per second; ValueError (one line) when it does not read as a rate."""
    try:
        return parse_rate(text) / 8
    except ValueError as e:
        raise ValueError(f"--state-upload-rate: {e}") from None


@takes(AggregatorFlags.parameters())
def aggregator(**values: Any) -> None:
    """Serve a run: DHT bootstrap node, update collection, aggregation, checkpoints (aggregator-server)."""
    run_aggregator(AggregatorFlags.parsed(values))  # a bad flag fails here, before anything is made


def run_aggregator(flags: AggregatorFlags) -> None:
    """Serve the run until its last round, Ctrl-C or SIGTERM."""
    emit_line = printer(flags.as_json, describe_aggregator_event)
    _, main = aggregator_node(flags, on_event=emit_line)
    run_until_stopped(main)


def aggregator_node(
    flags: AggregatorFlags,
    *,
    on_event: Callable[[Event], None],
    config: RunConfig | None = None,
    task: Task | None = None,
) -> tuple[AggregatorServer, Coroutine[Any, Any, None]]:
    """The aggregator `flags` describe, its run prepared in its state directory, and the coroutine that serves it.

    What `potluck aggregator` runs and what `potluck.Aggregator` runs in its thread. `config`: the run's config
    as an object, in place of `flags.config`; `task`: the object to run as `flags.task` (not imported).
    """
    # torch and hivemind: imported when a node starts, not for --help
    from potluck.aggregator_server.server import AggregatorServer, ServerOptions
    from potluck.aggregator_server.setup import prepare_run
    from potluck.cli.node_web import PageOptions, aggregator_app, aggregator_page, serve_with_page
    from potluck.protocol.config_files import load_run_config, parse_overrides, run_config_from_mapping
    from potluck.tasks import allow_task

    prepare_node_process(flags.threads)
    state = flags.state_dir.expanduser()
    overrides = parse_overrides(list(flags.set_))
    if flags.task is not None:
        allow_task(flags.task, task)
        overrides.setdefault("task.name", flags.task)
    cfg = config.with_overrides(overrides) if config is not None and overrides else config
    if cfg is None and flags.config is not None:
        cfg = load_run_config(flags.config, overrides=overrides)
    elif cfg is None and overrides:
        cfg = run_config_from_mapping({}, overrides=overrides)
    # only once the config reads: a bad one fails with nothing written in the state directory
    own_identity = node_identity(flags.identity or state / "identity.key")
    run_cfg = prepare_run(state_dir=state, config=cfg, identity=own_identity)
    options = ServerOptions(
        state_dir=state,
        host_maddrs=(f"/ip4/{flags.host}/tcp/{flags.port}",),
        announce_maddrs=flags.announce,
        initial_peers=flags.join,
        multiaddr_file=flags.multiaddr_file,
        max_rounds=flags.max_rounds,
        wait_for_peers=flags.wait_for_peers,
        failover_after_s=flags.failover_after,
        state_upload_bytes_per_s=None if flags.state_upload_rate is None else _rate_bytes(flags.state_upload_rate),
        max_connections=flags.max_connections,
    )
    page = PageOptions(
        host=flags.http_host,
        port=DEFAULT_HTTP_PORT if flags.http_port is None else flags.http_port,
        required=flags.http_port is not None,
        admin_token=_read_admin_token(flags.admin_token_file),
        max_per_address=flags.http_per_address,
    )
    status, emit = aggregator_page(on_event=on_event)
    server = AggregatorServer(run_cfg, own_identity, options, on_event=emit)
    return server, serve_with_page(server.serve(), aggregator_app(status, server, page), page, on_event=on_event)


def _read_admin_token(path: Path | None) -> str | None:
    """The admin bearer token from its file (stripped); UsageError when unreadable or too short to be secret."""
    if path is None:
        return None
    try:
        token = path.expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the admin token from {path} ({e}); check the path") from None
    if len(token) < 16:
        raise UsageError(f"the admin token in {path} is {len(token)} characters; use at least 16 random ones")
    return token
