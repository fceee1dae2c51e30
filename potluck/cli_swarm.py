"""`potluck swarm` (the embedded default main job) and `potluck doctor` (the volunteer's pre-flight check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

stderr = Console(stderr=True)
stdout = Console()


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB" if n < 10**6 else f"{n / 10**6:,.2f} MB"


def swarm(
    peers: Annotated[int, typer.Option(help="Peer processes to start.", min=1, max=64)] = 3,
    rounds: Annotated[int, typer.Option(help="Outer rounds to train.", min=1)] = 6,
    local_steps: Annotated[
        int | None, typer.Option("--local-steps", help="Inner steps per round (H). [default: the config's]", min=1)
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config (TOML/YAML). [default: the embedded tiny run]")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Train on your own text: a file, a directory or hf:<dir>. [default: Python's stdlib]"),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="The aggregator's directory. [default: a temporary one]")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Stop everything after this many seconds.", min=1)] = 1800.0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one config field, e.g. --set round_deadline_s=60; repeatable."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")] = False,
) -> None:
    """Start an aggregator and N peers on 127.0.0.1 as separate processes and train the run to its end."""
    from potluck.protocol.config import RunConfig, load_run_config, parse_overrides
    from potluck.swarm import SwarmOptions, run_swarm

    overrides: dict[str, Any] = {"rounds": rounds, **parse_overrides(set_ or [])}
    if local_steps is not None:
        overrides["local_steps"] = local_steps
    if data is not None:
        overrides["data.source"] = data
    base = load_run_config(config) if config is not None else RunConfig()
    cfg = base.with_overrides(overrides, source="flags")
    options = SwarmOptions(
        peers=peers, cfg=cfg, data=data, state_dir=state_dir.expanduser() if state_dir else None, timeout_s=timeout
    )
    status: dict[str, Any] = {"loss": None, "peers": set(), "up": 0, "down": 0, "round": 0}
    with Progress(
        TextColumn("round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=False,
    ) as progress:
        task = progress.add_task("starting", total=cfg.rounds)

        def on_event(name: str, event: dict[str, Any]) -> None:
            kind = event.get("event")
            if name == "aggregator" and kind == "ready":
                status["loss"] = event["val_loss"]
                status["round"] = event["round"]
                progress.console.print(f"join this swarm from another terminal:  peer --join {event['maddrs'][0]}")
            elif name == "aggregator" and kind == "round":
                status["loss"] = event["val_loss"]
                status["round"] = event["round"] + 1
                status["peers"] = {a["fingerprint"] for a in event["accepted"]}
            elif name != "aggregator" and kind == "round":
                status["up"] += event["bytes_up"]
                status["down"] += event["bytes_down"]
            elif kind == "rejected":
                progress.console.print(f"rejected {event['fingerprint']} round {event['round']}: {event['reason']}")
            loss = "-" if status["loss"] is None else f"{status['loss']:.4f}"
            progress.update(
                task,
                completed=status["round"],
                description=f"held-out loss {loss} | {len(status['peers'])} peers | "
                f"up {_kb(status['up'])} down {_kb(status['down'])}",
            )

        result = run_swarm(options, on_event=on_event)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    _print_summary(result)


def _print_summary(result: Any) -> None:
    table = Table(title=f"{result.rounds_completed} rounds in {result.wall_s:.0f} s")
    for column in ("peer", "fingerprint", "joined", "accepted", "rejected", "up", "down", "compression"):
        table.add_column(column, justify="right")
    dense = 4 * result.num_params  # one fp32 pseudo-gradient
    for row in result.peers:
        sent = [r["bytes_up"] for r in row["rounds"]]
        ratio = f"{dense / (sum(sent) / len(sent)):,.0f}x" if sent else "-"
        table.add_row(
            row["name"],
            str(row["fingerprint"]),
            str(row["joined_round"]),
            str(row["accepted"]),
            str(row["rejected"]),
            _kb(row["bytes_up"]),
            _kb(row["bytes_down"]),
            ratio,
        )
    stdout.print(table)
    stdout.print(
        f"held-out loss {result.initial_val_loss:.4f} -> {result.final_val_loss:.4f}; "
        f"compression: upload per round vs one dense fp32 update of {result.num_params:,} parameters"
    )


def doctor(
    join: Annotated[
        list[str] | None, typer.Option("--join", "-j", help="An aggregator's multiaddr to test; repeatable.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed for each network step.", min=1)] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Pre-flight check: p2pd starts, the join address answers, reachability, link rates, device, disk."""
    from potluck.doctor import run_doctor

    raise typer.Exit(run_doctor(join=list(join or []), as_json=as_json, timeout_s=timeout))
