"""`potluck aggregator` (and the `aggregator-server` script): serve a run until its last round, Ctrl-C or SIGTERM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from potluck.cli.common import DEFAULT_HTTP_PORT, DEFAULT_STATE_DIR, UsageError
from potluck.cli.process import node_identity, run_until_stopped, set_threads
from potluck.cli.status_lines import describe_aggregator_event, printer
from potluck.lab.netlab import parse_rate


def _rate_bytes(text: str) -> float:
    """`--state-upload-rate` in bytes per second; UsageError (one line) when it does not read as a rate."""
    try:
        return parse_rate(text) / 8
    except ValueError as e:
        raise UsageError(f"--state-upload-rate: {e}") from None


def aggregator(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config (TOML/YAML). [default: the embedded tiny run]")
    ] = None,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Durable state: keys, run.toml, checkpoints, spool.")
    ] = DEFAULT_STATE_DIR,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", "-i", help="Ed25519 key, created on first run. [default: STATE_DIR/identity.key]"),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "0.0.0.0",
    port: Annotated[
        int,
        typer.Option(
            help="TCP port to listen on; fix it so peers can rejoin after a restart (0: any).", min=0, max=65535
        ),
    ] = 0,
    announce: Annotated[
        list[str] | None,
        typer.Option("--announce", help="Multiaddr peers should dial (e.g. your public IP); repeatable."),
    ] = None,
    join: Annotated[
        list[str] | None,
        typer.Option("--join", help="Another node's multiaddr to bootstrap the DHT from; repeatable."),
    ] = None,
    multiaddr_file: Annotated[
        Path | None, typer.Option("--multiaddr-file", help="Write the full multiaddrs here, one a line, once ready.")
    ] = None,
    max_rounds: Annotated[
        int | None, typer.Option("--max-rounds", help="Leave after closing this many rounds.", min=1)
    ] = None,
    wait_for_peers: Annotated[
        int,
        typer.Option(
            "--wait-for-peers",
            help="Start together: hold the state (up to 60 s) and the first round (up to 3 deadlines) "
            "until N peers have joined.",
            min=0,
        ),
    ] = 0,
    failover_after: Annotated[
        float,
        typer.Option(
            "--failover-after",
            help="For a standby (a key listed after its shard's owner in aggregator_keys): take the shard over "
            "once the owner has not answered, nor re-announced itself on the DHT, for this many seconds.",
            min=1,
        ),
    ] = 20.0,
    state_upload_rate: Annotated[
        str | None,
        typer.Option(
            "--state-upload-rate",
            help="Cap what this aggregator sends joiners as state chunks, e.g. 20mbit: joiners then take more "
            "from the peers that hold the state, and rounds keep the rest of the link. [default: no cap]",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one config field, e.g. --set local_steps=20; repeatable."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch. [default: torch's]", min=1)] = None,
    http_port: Annotated[
        int | None,
        typer.Option("--http-port", help="Status page, JSON API and /metrics port (0: none). [default: 8000]", min=0),
    ] = None,
    http_host: Annotated[
        str, typer.Option("--http-host", help="Status page address (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    admin_token_file: Annotated[
        Path | None,
        typer.Option("--admin-token-file", help="File holding the bearer token that enables the admin endpoints."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per event on stdout.")] = False,
) -> None:
    """Serve a run: DHT bootstrap node, update collection, aggregation, checkpoints (aggregator-server)."""
    # torch and hivemind: imported when a node starts, not for --help
    from potluck.aggregator_server.server import AggregatorServer, ServerOptions
    from potluck.aggregator_server.setup import prepare_run
    from potluck.cli.node_web import PageOptions, aggregator_app, aggregator_page, serve_with_page
    from potluck.protocol.config import load_run_config, parse_overrides, run_config_from_mapping

    upload_cap = None if state_upload_rate is None else _rate_bytes(state_upload_rate)  # before anything is made
    set_threads(threads)
    state = state_dir.expanduser()
    own_identity = node_identity(identity or state / "identity.key")
    overrides = parse_overrides(set_ or [])
    cfg = None
    if config is not None:
        cfg = load_run_config(config, overrides=overrides)
    elif overrides:
        cfg = run_config_from_mapping({}, overrides=overrides)
    run_cfg = prepare_run(state_dir=state, config=cfg, identity=own_identity)
    options = ServerOptions(
        state_dir=state,
        host_maddrs=(f"/ip4/{host}/tcp/{port}",),
        announce_maddrs=tuple(announce or ()),
        initial_peers=tuple(join or ()),
        multiaddr_file=multiaddr_file,
        max_rounds=max_rounds,
        wait_for_peers=wait_for_peers,
        failover_after_s=failover_after,
        state_upload_bytes_per_s=upload_cap,
    )
    page = PageOptions(
        host=http_host,
        port=DEFAULT_HTTP_PORT if http_port is None else http_port,
        required=http_port is not None,
        admin_token=_read_admin_token(admin_token_file),
    )
    emit_line = printer(as_json, describe_aggregator_event)
    status, emit = aggregator_page(on_event=emit_line)
    server = AggregatorServer(run_cfg, own_identity, options, on_event=emit)
    run_until_stopped(serve_with_page(server.serve(), aggregator_app(status, server, page), page, on_event=emit_line))


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
