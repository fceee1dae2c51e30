"""The long-running node commands: `potluck aggregator` / `aggregator-server` and `potluck peer` / `peer`.

Each runs one asyncio loop until its work is done, Ctrl-C or SIGTERM; on any of these the DHT node
and its libp2p daemon are shut down before the process exits. Status goes to stdout, one line per
event (or one JSON object per line with `--json`, which is what `potluck swarm` reads); logs go to
stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from potluck.events import (
    AggregatorDone,
    AggregatorReady,
    DonorDropped,
    Event,
    Failover,
    Finished,
    Followed,
    Following,
    PeerDone,
    PeerPlan,
    PeerRound,
    PeerSynced,
    ReceiptInvalid,
    RoundClosed,
    RoundError,
    ServerlessReady,
    ServerlessRound,
    ServerlessSynced,
    StateRefused,
    StatusPage,
    Takeover,
    UpdateRejected,
    encode_event,
)

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("~/.potluck/aggregator")


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run `main`; SIGTERM cancels it like Ctrl-C does, so its cleanup runs either way."""

    async def guarded() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers off the main thread
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        await main

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every thread's stack
    signal.signal(signal.SIGTERM, interrupt)  # until the loop takes over: a SIGTERM during start-up still cleans up
    try:
        asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("interrupted: the node and its p2pd have stopped", file=sys.stderr, flush=True)
        raise typer.Exit(130) from None
    finally:
        # The node has stopped; what is left is the interpreter's own teardown, whose garbage collections
        # walk every object torch and hivemind made (about a CPU-second per process, five seconds of wall
        # time when a local swarm's nine processes exit together). Frozen objects are not walked.
        gc.freeze()


def _loss(value: object) -> str:
    """A held-out loss for a status line; a shard's aggregator has none (its peers score the model)."""
    return "n/a (sharded)" if value is None else f"{value:.4f}"


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB" if n < 10**6 else f"{n / 10**6:,.2f} MB"


def _printer(as_json: bool, describe: Callable[[Event], str | None]) -> Callable[[Event], None]:
    def emit(event: Event) -> None:
        if as_json:
            print(json.dumps(encode_event(event)), flush=True)
            return
        line = describe(event)
        if line:
            print(line, flush=True)

    return emit


def describe_aggregator_event(e: Event) -> str | None:
    """One human line for an aggregator event."""
    if isinstance(e, AggregatorReady):
        resumed = f", resumed at round {e.round} with {e.spooled_updates} spooled update(s)" if e.resumed else ""
        lines = [f"aggregator {e.fingerprint} serving run {e.run!r} (config {e.config_hash[:12]}){resumed}"]
        lines += [f"  join with: peer --join {m}" for m in e.maddrs]
        shard = ""
        if e.shards > 1:
            shard = f", shard {e.shard + 1} of {e.shards} ({e.num_params:,} parameters)"
        if e.standby_of:
            lines.append(f"standby for aggregator {e.standby_of}{shard}: serves nothing until that one goes")
        else:
            lines.append(f"round {e.round} open, held-out loss {_loss(e.val_loss)}{shard}")
        return "\n".join(lines)
    if isinstance(e, RoundClosed):
        return (
            f"round {e.round} closed ({e.closed_by}): held-out loss {_loss(e.val_loss)}, {len(e.accepted)} update(s) "
            f"accepted, {e.rejected} rejected, {e.tokens:,} tokens, aggregate {_kb(e.aggregate_bytes)}, "
            f"{e.round_s:.1f} s (aggregation {e.aggregation_s:.2f} s)"
        )
    if isinstance(e, UpdateRejected):
        return f"rejected an update from {e.fingerprint} for round {e.round}: {e.reason}"
    if isinstance(e, StatusPage):
        return f"status page: {e.url}"
    if isinstance(e, RoundError):
        return f"error in round {e.round}: {e.detail}"
    if isinstance(e, Following):
        return f"standing by for aggregator {e.primary}: a copy of its shard at round {e.round}"
    if isinstance(e, Followed):
        return f"standby: applied round {e.round}'s aggregate (state {e.state_sha256[:12]})"
    if isinstance(e, Takeover):
        return (
            f"aggregator {e.primary} is gone: taking its shard over at round {e.round}, "
            f"waiting for the {e.expected} peer(s) it last heard from"
        )
    if isinstance(e, AggregatorDone):
        return f"aggregator stopped after {e.rounds_closed} round(s); next round would be {e.round}"
    return None


def describe_peer_event(e: Event) -> str | None:
    """One human line for a peer event (one per round)."""
    if isinstance(e, PeerSynced):
        given = [n for n, b in e.state_sources.items() if b]
        spread = f" from {len(given)} sources" if len(given) > 1 else ""
        return f"peer {e.fingerprint} joined run {e.run!r} at round {e.round} (state {_kb(e.state_bytes)}{spread})"
    if isinstance(e, DonorDropped):
        return f"stopped fetching state chunks from {e.donor} ({e.reason}); the others give the rest"
    if isinstance(e, PeerRound):
        verdict = "accepted" if e.accepted else f"rejected ({e.reason})"
        if e.points is not None and e.accepted:
            verdict += f", +{e.points:,.0f} points"
        network = e.upload_s + e.wait_s + e.download_s
        hidden = " (overlapped)" if e.overlap else ""
        stale = f" ({e.stale_steps} stale)" if e.stale_steps else ""
        held_out = "" if e.val_loss is None else f" | held-out {e.val_loss:.3f}"
        return (
            f"round {e.round:>4} | loss {e.loss:.3f}{held_out} | {e.tokens_per_s:,.0f} tok/s | "
            f"up {_kb(e.bytes_up)} "
            f"down {_kb(e.bytes_down)} | {e.inner_steps} steps{stale} in {e.compute_s:.1f} s, "
            f"network {network:.1f} s{hidden} | {verdict}"
        )
    if isinstance(e, PeerPlan):
        from potluck.planning.plan import AutoPlan

        return AutoPlan(**{k: v for k, v in encode_event(e).items() if k != "event"}).line()
    if isinstance(e, Failover):
        return f"shard {e.shard}: aggregator {e.from_} is gone; switched to its standby {e.to}"
    if isinstance(e, StateRefused):
        return f"refused the state aggregator {e.aggregator} served ({e.detail}); trying another source"
    if isinstance(e, Finished):
        return e.detail
    if isinstance(e, PeerDone):
        return (
            f"left after {e.rounds} round(s): {e.accepted} accepted, {e.rejected} rejected, "
            f"up {_kb(e.bytes_up)}, down {_kb(e.bytes_down)}, {e.score:,.0f} points in "
            f"{e.receipts} verified receipt(s)"
            + (
                f", {e.inner_steps} inner steps, busy {e.compute_utilization:.0%} of the time"
                if e.compute_utilization is not None
                else ""
            )
        )
    if isinstance(e, StatusPage):
        return f"status page: {e.url}"
    if isinstance(e, ReceiptInvalid):
        return f"round {e.round}: the aggregator's receipt does not verify: {e.detail}"
    return None


def _rate_bytes(text: str) -> float:
    """`--state-upload-rate` in bytes per second; UsageError (one line) when it does not read as a rate."""
    from potluck.cli import UsageError
    from potluck.lab.netlab import parse_rate

    try:
        return parse_rate(text) / 8
    except ValueError as e:
        raise UsageError(f"--state-upload-rate: {e}") from None


def _set_threads(threads: int | None) -> None:
    from potluck.training.device import set_cpu_threads

    set_cpu_threads(threads)


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
    from potluck.aggregator_server.server import AggregatorServer, ServerOptions
    from potluck.aggregator_server.setup import prepare_run
    from potluck.protocol.config import load_run_config, parse_overrides, run_config_from_mapping

    upload_cap = None if state_upload_rate is None else _rate_bytes(state_upload_rate)  # before anything is made
    _set_threads(threads)
    state = state_dir.expanduser()
    node_identity = _node_identity(identity or state / "identity.key")
    overrides = parse_overrides(set_ or [])
    cfg = None
    if config is not None:
        cfg = load_run_config(config, overrides=overrides)
    elif overrides:
        cfg = run_config_from_mapping({}, overrides=overrides)
    run_cfg = prepare_run(state_dir=state, config=cfg, identity=node_identity)
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
    from potluck.node_web import DEFAULT_HTTP_PORT, PageOptions, aggregator_app, aggregator_page, serve_with_page

    page = PageOptions(
        host=http_host,
        port=DEFAULT_HTTP_PORT if http_port is None else http_port,
        required=http_port is not None,
        admin_token=_read_admin_token(admin_token_file),
    )
    printer = _printer(as_json, describe_aggregator_event)
    status, emit = aggregator_page(on_event=printer)
    server = AggregatorServer(run_cfg, node_identity, options, on_event=emit)
    run_until_stopped(serve_with_page(server.serve(), aggregator_app(status, server, page), page, on_event=printer))


def _read_admin_token(path: Path | None) -> str | None:
    """The admin bearer token from its file (stripped); UsageError when unreadable or too short to be secret."""
    from potluck.cli import UsageError

    if path is None:
        return None
    try:
        token = path.expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the admin token from {path} ({e}); check the path") from None
    if len(token) < 16:
        raise UsageError(f"the admin token in {path} is {len(token)} characters; use at least 16 random ones")
    return token


def peer(
    join: Annotated[
        list[str] | None,
        typer.Option(
            "--join",
            "-j",
            help="The aggregator's status page (http://HOST:8000) or multiaddr (as it printed it); repeatable. "
            "With --serverless: another peer's multiaddr (none: this peer starts the run).",
        ),
    ] = None,
    identity: Annotated[Path, typer.Option("--identity", "-i", help="Ed25519 key, created on first run.")] = Path(
        "~/.potluck/identity.key"
    ),
    data: Annotated[
        str | None,
        typer.Option(help="Train on your own text: a file, a directory or hf:<dir>. [default: the run's data]"),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Sequences per inner step. [default: the run's]", min=1)
    ] = None,
    max_rounds: Annotated[
        int | None, typer.Option("--max-rounds", help="Leave cleanly after this many rounds.", min=1)
    ] = None,
    client_mode: Annotated[
        bool, typer.Option("--client-mode", help="Behind NAT: dial out only, accept no connections.")
    ] = False,
    run: Annotated[str | None, typer.Option(help="Which run to join when the DHT carries several.")] = None,
    port: Annotated[int, typer.Option(help="TCP port to listen on (0: any).", min=0, max=65535)] = 0,
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on. [default: 127.0.0.1 when every --join is on it, else 0.0.0.0]"),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch. [default: torch's]", min=1)] = None,
    reconnect_timeout: Annotated[
        float,
        typer.Option("--reconnect-timeout", help="Give up after this many seconds without the aggregator.", min=1),
    ] = 300.0,
    join_timeout: Annotated[
        float, typer.Option("--join-timeout", help="Seconds to wait for the --join address to answer.", min=1)
    ] = 30.0,
    receipts: Annotated[
        Path, typer.Option("--receipts", help="Keep the aggregator's signed receipts here (potluck receipts verify).")
    ] = Path("~/.potluck/receipts"),
    http_port: Annotated[
        int, typer.Option("--http-port", help="Serve this peer's own status (JSON) on this port (0: none).", min=0)
    ] = 0,
    http_host: Annotated[str, typer.Option("--http-host", help="Address of this peer's status page.")] = "127.0.0.1",
    overlap: Annotated[
        bool,
        typer.Option(
            "--overlap/--no-overlap",
            help=(
                "Keep training while an update is in flight (from a guess of the next state) and merge the "
                "aggregate when it arrives: worth it where communication is a real part of a round."
            ),
        ),
    ] = False,
    overlap_limit: Annotated[
        float,
        typer.Option(
            "--overlap-limit",
            help=(
                "With --overlap: at most this share of a round's inner steps run before the round's state "
                "arrives; then training waits for it (1: no limit). An update trained wholly ahead of its state "
                "fails the aggregator's held-out check now and then (docs/experiments/overlap.md)."
            ),
            min=0.01,
            max=1.0,
        ),
    ] = 1.0,
    speed: Annotated[
        float,
        typer.Option(
            help="Testing aid: run each inner step at this fraction of full speed (0.25: four times as long).",
            min=0.01,
            max=1.0,
        ),
    ] = 1.0,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan/--no-plan",
            help="At start-up, time a few inner steps and probe the link to the aggregator (~2 s), then log the "
            "scaling efficiency K the run's settings give here and the local steps that would give K >= 0.9.",
        ),
    ] = False,
    plan_peers: Annotated[
        int, typer.Option("--plan-peers", help="Peers the start-up plan assumes for He et al.'s formula.", min=1)
    ] = 8,
    eval_batches: Annotated[
        int,
        typer.Option(
            "--eval-batches",
            help="After each round, score the model on this many of the run's held-out batches and print the "
            "loss (0: never). In a sharded run no aggregator holds the whole model, so a peer is where it is scored.",
            min=0,
        ),
    ] = 0,
    serve_state: Annotated[
        bool,
        typer.Option(
            "--serve-state/--no-serve-state",
            help="Serve chunks of the model state this peer holds to peers that join later, so no one source "
            "uploads the whole model to every joiner (never in --client-mode: nobody can dial in).",
        ),
    ] = True,
    serverless: Annotated[
        bool,
        typer.Option(
            "--serverless",
            help="No aggregator: average with the other peers through hivemind's all-reduce and step locally "
            "(no validation of anyone's update: for peers that trust each other).",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="With --serverless: the run config. [default: the embedded tiny run]"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="With --serverless: override one config field; repeatable."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per event on stdout.")] = False,
) -> None:
    """Volunteer: join a run, train locally, send compressed signed updates, apply the aggregates (peer)."""
    from potluck.cli import UsageError
    from potluck.peer.join_url import resolve_joins
    from potluck.peer.runner import PeerOptions, PeerRunner, join_addresses
    from potluck.training.device import pick_device

    if overlap_limit < 1 and not overlap:
        raise UsageError("--overlap-limit only applies with --overlap")
    if serverless and overlap:
        raise UsageError(
            "--overlap does not apply with --serverless: a serverless peer averages its state at the end of each round"
        )
    if serverless:
        _serverless_peer(
            join=tuple(join or ()),
            identity=identity,
            config=config,
            set_=set_ or [],
            data=data,
            device=device,
            batch_size=batch_size,
            max_rounds=max_rounds,
            client_mode=client_mode,
            host=host,
            port=port,
            threads=threads,
            speed=speed,
            as_json=as_json,
        )
        return
    if config is not None or set_:
        raise UsageError("--config and --set only apply with --serverless: a run with an aggregator uses its config")
    addresses = join_addresses(resolve_joins(join or [], timeout_s=join_timeout))
    _set_threads(threads)
    node_identity = _node_identity(identity)
    options = PeerOptions(
        join=addresses,
        host_maddrs=(_listen_maddr(host, port, addresses),),
        client_mode=client_mode,
        run=run,
        data=data,
        device=pick_device(device),
        batch_size=batch_size,
        max_rounds=max_rounds,
        reconnect_timeout_s=reconnect_timeout,
        join_timeout_s=join_timeout,
        receipts_dir=receipts.expanduser(),
        overlap=overlap,
        overlap_limit=overlap_limit,
        speed=speed,
        plan=plan,
        plan_peers=plan_peers,
        eval_batches=eval_batches,
        serve_state=serve_state,
    )
    from potluck.node_web import PageOptions, peer_app, peer_page, serve_with_page

    page = PageOptions(host=http_host, port=http_port)
    printer = _printer(as_json, describe_peer_event)
    status, emit = peer_page(on_event=printer)
    runner = PeerRunner(node_identity, options, on_event=emit)
    run_until_stopped(serve_with_page(runner.run(), peer_app(status), page, on_event=printer))


def _serverless_peer(
    *,
    join: tuple[str, ...],
    identity: Path,
    config: Path | None,
    set_: list[str],
    data: str | None,
    device: str,
    batch_size: int | None,
    max_rounds: int | None,
    client_mode: bool,
    host: str | None,
    port: int,
    threads: int | None,
    speed: float,
    as_json: bool,
) -> None:
    """`peer --serverless`: a peer of a run with no aggregator (potluck/peer/serverless.py)."""
    from potluck.peer.serverless import ServerlessOptions, ServerlessPeer
    from potluck.protocol.config import parse_overrides, run_config_or_default
    from potluck.protocol.node import parse_join_address
    from potluck.training.device import pick_device

    for address in join:
        parse_join_address(address)  # a typo fails here, in one line, before anything starts
    cfg = run_config_or_default(config, overrides=parse_overrides(set_))
    _set_threads(threads)
    node_identity = _node_identity(identity)
    options = ServerlessOptions(
        cfg=cfg,
        join=join,
        host_maddrs=(_listen_maddr(host, port, join),),
        client_mode=client_mode,
        data=data,
        device=pick_device(device),
        batch_size=batch_size,
        max_rounds=max_rounds,
        speed=speed,
    )
    runner = ServerlessPeer(node_identity, options, on_event=_printer(as_json, describe_serverless_event))
    run_until_stopped(runner.run())


def describe_serverless_event(event: Event) -> str | None:
    """One status line per serverless event worth a human's attention."""
    if isinstance(event, ServerlessReady):
        maddrs = event.maddrs or ("?",)
        return f"serverless peer up; others join with: peer --serverless --join {maddrs[0]}"
    if isinstance(event, ServerlessSynced):
        return f"run {event.run!r}: starting at round {event.round} (state from the {event.source})"
    if isinstance(event, ServerlessRound):
        return (
            f"round {event.round}: held-out loss {event.val_loss:.4f}, averaged in a group of {event.group} "
            f"({event.average_s:.1f} s), {event.tokens} tokens"
        )
    return None


def status(
    join: Annotated[
        list[str], typer.Option("--join", "-j", help="A serverless peer's multiaddr (as it printed it); repeatable.")
    ],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the DHT.", min=1)] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """A serverless run's state, read from the DHT: its peers' rounds and held-out losses (it has no status page)."""
    from potluck.peer.serverless import serverless_status
    from potluck.protocol.node import parse_join_address

    for address in join:
        parse_join_address(address)
    runs = serverless_status(join, timeout_s=timeout)
    if as_json:
        print(json.dumps({"runs": runs}))
        return
    if not runs:
        print("no serverless run on this DHT (a peer's record appears after its first round)")
        return
    for run, peers in sorted(runs.items()):
        newest = peers[0]
        print(
            f"run {run!r}: {len(peers)} peer(s); newest record: round {newest['round']} of {newest['rounds']}, "
            f"held-out loss {newest['val_loss']:.4f}"
        )
        for p in peers:
            age = time.time() - p["time_s"]
            print(f"  {p['peer']}  round {p['round']}  loss {p['val_loss']:.4f}  group {p['group']}  {age:.0f} s ago")


def _node_identity(path: Path) -> Any:
    """The node's Ed25519 identity at `path`, created (and said so) on its first run."""
    from potluck.protocol.identity import load_or_create_identity

    node_identity, created = load_or_create_identity(path.expanduser())
    if created:
        logger.warning("created identity %s at %s", node_identity.fingerprint, path)
    return node_identity


def _listen_maddr(host: str | None, port: int, joins: tuple[str, ...]) -> str:
    """Where a peer listens: `host`, else loopback when it joins only loopback addresses, else every interface."""
    loopback = bool(joins) and all(a.startswith(("/ip4/127.", "/ip6/::1/")) for a in joins)
    return f"/ip4/{host or ('127.0.0.1' if loopback else '0.0.0.0')}/tcp/{port}"


def single_command_main(command: Callable[..., None], name: str) -> Callable[[], None]:
    """A console-script entry point running one command (`peer`, `aggregator-server`) with potluck's error handling."""

    def main() -> None:
        from potluck.cli import handle_errors, setup_logging

        setup_logging(False)
        single = typer.Typer(name=name, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
        single.command(name=name)(command)
        handle_errors(lambda: single(prog_name=name))

    return main


def peer_main() -> None:
    """The `peer` console script."""
    single_command_main(peer, "peer")()


def aggregator_main() -> None:
    """The `aggregator-server` console script."""
    single_command_main(aggregator, "aggregator-server")()


bans_app = typer.Typer(help="List, add and lift bans of an aggregator's run (its --state-dir).", no_args_is_help=True)
_STATE_DIR_OPTION = typer.Option("--state-dir", help="The aggregator's state directory.")


def _resolve_key(reputation: Any, key: str) -> bytes:
    """A public key from 64 hex characters, or from a fingerprint the ban list already knows."""
    from potluck.cli import UsageError
    from potluck.protocol.identity import fingerprint, public_key_from_hex

    if key.startswith("pl-"):
        for known in [*reputation.bans, *reputation.strikes]:
            if fingerprint(known) == key:
                return known
        raise UsageError(f"{key} is not in this run's ban list; give the 64-hex public key instead")
    try:
        return public_key_from_hex(key)
    except ValueError as e:
        raise UsageError(str(e)) from None


@bans_app.command("list")
def bans_list(
    state_dir: Annotated[Path, _STATE_DIR_OPTION] = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """The banned keys, with why and when, and the keys with strikes against them."""
    from potluck.aggregator_server.reputation import Reputation
    from potluck.protocol.identity import fingerprint

    reputation = Reputation.open(state_dir.expanduser())
    bans = [
        {
            "fingerprint": fingerprint(b.public_key),
            "public_key": b.public_key.hex(),
            "reason": b.reason,
            "round": b.round,
        }
        for b in reputation.bans.values()
    ]
    strikes = {fingerprint(k): v for k, v in reputation.strikes.items() if k not in reputation.bans}
    if as_json:
        print(json.dumps({"bans": bans, "strikes": strikes}))
        return
    if not bans:
        print("no banned keys")
    for b in bans:
        when = "by an operator" if b["round"] < 0 else f"in round {b['round']}"
        print(f"{b['fingerprint']}  banned {when}: {b['reason']}  ({b['public_key']})")
    for who, rounds in strikes.items():
        print(f"{who}  {len(rounds)} strike(s), rounds {', '.join(map(str, rounds))}")


@bans_app.command("add")
def bans_add(
    key: Annotated[str, typer.Argument(help="The peer's public key (64 hex) or a fingerprint with strikes.")],
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "banned by the operator",
    state_dir: Annotated[Path, _STATE_DIR_OPTION] = DEFAULT_STATE_DIR,
) -> None:
    """Ban a key for the rest of the run (a running aggregator picks it up at the next update)."""
    from potluck.aggregator_server.reputation import Reputation
    from potluck.protocol.identity import fingerprint

    reputation = Reputation.open(state_dir.expanduser())
    public_key = _resolve_key(reputation, key)
    reputation.ban(public_key, reason=reason)
    print(f"banned {fingerprint(public_key)}")


@bans_app.command("lift")
def bans_lift(
    key: Annotated[str, typer.Argument(help="The banned peer's fingerprint or public key (64 hex).")],
    state_dir: Annotated[Path, _STATE_DIR_OPTION] = DEFAULT_STATE_DIR,
) -> None:
    """Lift a ban and forget the key's strikes."""
    from potluck.aggregator_server.reputation import Reputation
    from potluck.protocol.identity import fingerprint

    reputation = Reputation.open(state_dir.expanduser())
    public_key = _resolve_key(reputation, key)
    if not reputation.lift(public_key):
        from potluck.cli import UsageError

        raise UsageError(f"{fingerprint(public_key)} is not banned")
    print(f"lifted the ban on {fingerprint(public_key)}")
