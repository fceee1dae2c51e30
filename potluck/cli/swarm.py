"""`potluck swarm`: the embedded default main job, an aggregator and N peers trained to the end of a run here.

The processes are started by potluck.lab.swarm; each peer's flags are the `PeerFlags` (or `ServerlessFlags`)
this command builds once from its own, so a peer flag is declared and checked in one place.
"""

from __future__ import annotations

import functools
import io
import json
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from potluck.cli.common import DEFAULT_HTTP_PORT, UsageError, stderr, stdout
from potluck.cli.flags import as_written
from potluck.cli.peer_flags import PeerFlags
from potluck.cli.serverless import ServerlessFlags
from potluck.events import (
    AggregatorReady,
    Event,
    PeerRound,
    PeerSynced,
    RoundClosed,
    ServerlessReady,
    ServerlessRound,
    StatusPage,
    SwarmKilled,
    Takeover,
    UpdateRejected,
)
from potluck.lab.netlab import parse_link, unavailable_reason


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB" if n < 10**6 else f"{n / 10**6:,.2f} MB"


def _status_page_port(asked: int | None) -> int:
    """The port asked for; by default 8000 when it is free now, else none (with a warning): never a failed swarm."""
    if asked is not None:
        return asked
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DEFAULT_HTTP_PORT))
        except OSError:
            stderr.print(f"port {DEFAULT_HTTP_PORT} is busy: no status page (pass --http-port PORT for one)")
            return 0
    return DEFAULT_HTTP_PORT


def parse_speeds(text: str | None, *, peers: int) -> tuple[float, ...]:
    """`--peer-speeds 1,0.5,0.25` as fractions of full speed, one per peer at most; UsageError otherwise."""
    if not text:
        return ()
    try:
        speeds = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--peer-speeds {text!r}: give comma-separated fractions, e.g. 1,0.5,0.25") from None
    if len(speeds) > peers:
        raise UsageError(f"--peer-speeds names {len(speeds)} peers but the swarm has {peers}")
    if not all(0.01 <= v <= 1 for v in speeds):
        raise UsageError(f"--peer-speeds {text!r}: each speed must be between 0.01 and 1 (full speed)")
    return speeds


def _parse_link(text: str | None) -> Any:
    """`--link UP/DOWN` checked up front: a bad value or a machine without the lab fails in one line."""
    if text is None:
        return None
    try:
        link = parse_link(text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    reason = unavailable_reason()
    if reason is not None:
        raise UsageError(f"--link: {reason}")
    return link


KEPT_RUNS = Path("potluck-runs")  # where `potluck swarm` keeps its aggregator's state when not told


def swarm(
    peers: Annotated[int, typer.Option(help="Peer processes to start.", min=1, max=64)] = 3,
    rounds: Annotated[int, typer.Option(help="Outer rounds to train.", min=1)] = 6,
    local_steps: Annotated[
        int | None,
        typer.Option("--local-steps", help=as_written("Inner steps per round (H). [default: the config's]"), min=1),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help=as_written("Run config (TOML/YAML). [default: the embedded tiny run]")),
    ] = None,
    data: Annotated[
        str | None,
        PeerFlags.option(
            "data",
            help="Train on your own text: a text, .jsonl or .parquet file, a directory or hf:<dir>. "
            "[default: Python's stdlib]",
        ),
    ] = None,
    task: Annotated[
        str | None,
        PeerFlags.option(
            "task", help="Train a task of your own: package.module:attribute, imported from this Python installation."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help=as_written("The aggregator's directory, kept after the run. [default: a new one in potluck-runs/]"),
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Stop everything after this many seconds.", min=1)] = 1800.0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one config field, e.g. --set round_deadline_s=60; repeatable."),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port",
            help=as_written("The aggregator's status page on 127.0.0.1 (0: none). [default: 8000]"),
            min=0,
            max=65535,
        ),
    ] = None,
    overlap: Annotated[
        bool, PeerFlags.option("overlap", help="Peers train on while their updates are in flight.")
    ] = False,
    overlap_limit: Annotated[
        float,
        PeerFlags.option(
            "overlap_limit",
            help="With --overlap: the share of a round's steps a peer may take before the round's state arrives.",
        ),
    ] = 1.0,
    peer_speeds: Annotated[
        str | None,
        typer.Option(
            "--peer-speeds",
            help="Testing aid: slow chosen peers, e.g. 1,0.5,0.25 runs peer-2's steps at a quarter speed.",
        ),
    ] = None,
    link: Annotated[
        str | None,
        typer.Option(
            help="Put each process in its own network namespace behind a shaped link, UP/DOWN per peer, "
            "e.g. 10mbit/100mbit (the aggregator gets 1gbit/1gbit). Needs root and iproute2.",
        ),
    ] = None,
    serverless: Annotated[
        bool,
        typer.Option(
            "--serverless", help="No aggregator: the peers average among themselves (hivemind's all-reduce)."
        ),
    ] = False,
    aggregators: Annotated[
        int,
        typer.Option(
            "--aggregators",
            help="Cut the model into this many shards, each with an aggregator of its own (peer-0 then scores the "
            "held-out loss, which no shard's aggregator can).",
            min=1,
            max=8,
        ),
    ] = 1,
    standby: Annotated[
        bool,
        typer.Option("--standby", help="Give each shard a standby aggregator that takes over when its owner goes."),
    ] = False,
    kill_aggregator_at: Annotated[
        int | None,
        typer.Option(
            "--kill-aggregator-at",
            help="Testing aid (with --standby): SIGKILL aggregator-0 once its standby holds round N's result.",
            min=0,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")] = False,
) -> None:
    """Start an aggregator and N peers on 127.0.0.1 (or behind shaped links) and train the run to its end."""
    # torch and hivemind (the fork server preloads them): imported when the swarm starts, not for --help
    from potluck.lab.swarm import SwarmOptions, run_swarm
    from potluck.protocol.config import RunConfig
    from potluck.protocol.config_files import load_run_config, parse_overrides
    from potluck.tasks import allow_task

    if serverless and (link is not None or overlap or state_dir is not None or aggregators > 1):
        raise UsageError(
            "--serverless runs peers only, on 127.0.0.1: drop --link, --overlap, --state-dir and --aggregators"
        )
    # what every honest peer the swarm starts is given, checked as `peer` checks it
    peer = PeerFlags.parsed({"data": data, "task": task, "overlap": overlap, "overlap_limit": overlap_limit})
    if kill_aggregator_at is not None and not standby:
        raise UsageError("--kill-aggregator-at needs --standby: without one, killing the aggregator ends the run")
    overrides: dict[str, Any] = {"rounds": rounds, **parse_overrides(set_ or [])}
    if local_steps is not None:
        overrides["local_steps"] = local_steps
    if data is not None:
        overrides["data.source"] = data
    if task is not None:
        allow_task(task)
        overrides["task.name"] = task
    base = load_run_config(config) if config is not None else RunConfig()
    cfg = base.with_overrides(overrides, source="flags")
    # the trained model is never deleted with the swarm: its aggregator's directory stays (serverless peers keep none)
    kept = None if serverless else (state_dir or KEPT_RUNS / f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    options = SwarmOptions(
        link=_parse_link(link),
        peer=peer,
        peer_speeds=parse_speeds(peer_speeds, peers=peers),
        peers=peers,
        cfg=cfg,
        state_dir=kept.expanduser().resolve() if kept else None,
        timeout_s=timeout,
        http_port=0 if serverless else _status_page_port(http_port),
        serverless=ServerlessFlags.parsed({"data": data, "task": task}) if serverless else None,
        aggregators=aggregators,
        standby=standby,
        kill_aggregator_at=kill_aggregator_at,
    )
    with Progress(
        TextColumn("round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=False,
        disable=not stderr.is_terminal,  # piped: the per-round lines say it all, no bar cut at the width
    ) as progress:  # run_swarm stops every child on Ctrl-C and SIGTERM too
        result = run_swarm(options, on_event=_SwarmProgress(progress, rounds=cfg.rounds, serverless=serverless))
    kept_at = None if kept is None else kept.expanduser().resolve()
    if as_json:
        print(json.dumps({**result.to_dict(), "state_dir": None if kept_at is None else str(kept_at)}))
    elif serverless:
        groups = [row["groups"] for row in result.peers]
        stdout.print(
            f"{result.rounds_completed} rounds in {result.wall_s:.0f} s without an aggregator; held-out loss "
            f"{result.initial_val_loss:.4f} -> {result.final_val_loss:.4f}; averaging group sizes per peer: {groups}"
        )
    else:
        _print_summary(result)
        if kept_at is not None:
            own = "" if task is None else f" --task {task}"
            stdout.print(
                f"the run's state is kept in {kept_at}; take the model out with: "
                f"potluck export --state-dir {kept_at} --out {kept_at.name}-model{own}",
                soft_wrap=True,
            )


FIRST_AGGREGATOR = ("aggregator", "aggregator-0", "standby-0")  # the child whose rounds the progress bar follows


class _SwarmProgress:
    """The swarm's progress bar on stderr, fed every child's events, with the lines worth a human's eye above it.

    Where stderr is no terminal (CI, `docker logs`, a pipe) rich draws no bar: one status line per round instead.
    """

    def __init__(self, progress: Progress, *, rounds: int, serverless: bool) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=rounds)
        self.rounds = rounds
        self.lines = not progress.console.is_terminal  # a line per round, where no bar is drawn
        self.serverless = serverless
        self.loss: float | None = None  # the run's latest held-out loss
        self.round = 0  # rounds done
        self.peers: set[str] = set()  # whose updates the last round took
        self.up = 0  # bytes all peers uploaded, and downloaded
        self.down = 0
        self.group = 0  # peers in the last serverless average
        self.shown = 0  # the last round a status line was printed for

    def __call__(self, name: str, event: Event) -> None:
        """Follow child `name`'s event, then redraw the bar."""
        # unwrapped: a join line is copied whole, whatever the width; plain: a reason's [brackets] are no markup
        print_line = functools.partial(self.progress.console.print, soft_wrap=True, markup=False)
        if self.serverless and name == "peer-0" and isinstance(event, ServerlessReady | ServerlessRound):
            self.loss = event.val_loss
            self.round = event.round + isinstance(event, ServerlessRound)
            if isinstance(event, ServerlessReady):
                print_line(f"join this swarm:  peer --serverless --join {event.maddrs[0]}")
            else:
                self.group = event.group
        elif self.serverless:
            pass
        elif name in FIRST_AGGREGATOR and isinstance(event, StatusPage):
            print_line(f"status page: {event.url}")
        elif name in FIRST_AGGREGATOR and isinstance(event, AggregatorReady) and not event.standby_of:
            self.loss = event.val_loss  # None from a shard's aggregator: peer-0 scores the model
            self.round = event.round
            print_line(f"join this swarm from another terminal:  peer --join {event.maddrs[0]}")
        elif name in FIRST_AGGREGATOR and isinstance(event, RoundClosed):
            self.loss = event.val_loss if event.val_loss is not None else self.loss
            self.round = event.round + 1
            self.peers = {a.fingerprint for a in event.accepted}
        elif name == "swarm" and isinstance(event, SwarmKilled):
            print_line(f"killed {event.child} after round {event.after_round} (--kill-aggregator-at)")
        elif name == "standby-0" and isinstance(event, Takeover):
            print_line(f"standby-0 took shard 0 over at round {event.round}")
        elif name.startswith("peer-") and isinstance(event, PeerRound | PeerSynced):
            if event.val_loss is not None:
                self.loss = event.val_loss
            if isinstance(event, PeerRound):
                self.up += event.bytes_up
                self.down += event.bytes_down
        elif isinstance(event, UpdateRejected):
            print_line(f"rejected {event.fingerprint} round {event.round}: {event.reason}")
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        description = (
            f"held-out loss {loss} | averaging groups of {self.group}"
            if self.serverless
            else f"held-out loss {loss} | {len(self.peers)} peers | up {_kb(self.up)} down {_kb(self.down)}"
        )
        if self.lines and isinstance(event, RoundClosed | ServerlessRound) and self.round > self.shown:
            self.shown = self.round
            print_line(f"round {self.round}/{self.rounds} done | {description}")
        self.progress.update(self.task, completed=self.round, description=description)


# Where the whole table is wider than the terminal: two tables, each under 80 columns, the peer named in both.
NARROW_SUMMARY = (
    ("peer", "fingerprint", "joined", "accepted", "rejected"),
    ("peer", "steps", "busy", "up", "down", "compression"),
)
SUMMARY_COLUMNS = NARROW_SUMMARY[0] + NARROW_SUMMARY[1][1:]


def _summary_row(row: dict[str, Any], num_params: int) -> dict[str, str]:
    """One peer's cells of the summary, by column."""
    sent = [r["bytes_up"] for r in row["rounds"]]
    dense = 4 * num_params  # one fp32 pseudo-gradient
    return {
        "peer": row["name"],
        "fingerprint": str(row["fingerprint"]),
        "joined": str(row["joined_round"]),
        "accepted": str(row["accepted"]),
        "rejected": str(row["rejected"]),
        "steps": str(row["inner_steps"]),
        "busy": "-" if row["compute_utilization"] is None else f"{row['compute_utilization']:.0%}",
        "up": _kb(row["bytes_up"]),
        "down": _kb(row["bytes_down"]),
        "compression": f"{dense / (sum(sent) / len(sent)):,.0f}x" if sent else "-",
    }


def _table(title: str | None, columns: tuple[str, ...], rows: list[dict[str, str]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right", overflow="fold")  # a cell too wide wraps, never loses its end
    for row in rows:
        table.add_row(*(row[column] for column in columns))
    return table


def summary_tables(result: Any, *, width: int) -> list[Table]:
    """The swarm's per-peer summary: one table where it fits `width` columns, else two narrower ones.

    A terminal of 80-120 columns would otherwise cut every cell of the ten-column table short.
    """
    title = f"{result.rounds_completed} rounds in {result.wall_s:.0f} s"
    rows = [_summary_row(row, result.num_params) for row in result.peers]
    whole = _table(title, SUMMARY_COLUMNS, rows)
    measuring = Console(width=10_000, file=io.StringIO())
    if measuring.measure(whole).maximum <= width:
        return [whole]
    return [_table(title if i == 0 else None, columns, rows) for i, columns in enumerate(NARROW_SUMMARY)]


def _print_summary(result: Any) -> None:
    for table in summary_tables(result, width=stdout.width):
        stdout.print(table)
    if len(result.aggregators) > 1:
        for hub in result.aggregators:
            stdout.print(
                f"{hub['name']}: shard {hub['shard'] + 1} of {len(result.aggregators)}, {hub['num_params']:,} "
                f"parameters, {hub['updates_accepted']} updates in {hub['rounds_closed']} rounds, "
                f"ingest {_kb(hub['bytes_in'])}"
            )
    stdout.print(
        f"held-out loss {result.initial_val_loss:.4f} -> {result.final_val_loss:.4f}; "
        f"compression: upload per round vs one dense fp32 update of {result.num_params:,} parameters"
    )
