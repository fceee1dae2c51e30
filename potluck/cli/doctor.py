"""`potluck doctor`: the volunteer's pre-flight check (the checks themselves are potluck.cli.preflight)."""

from __future__ import annotations

from typing import Annotated

import typer


def doctor(
    join: Annotated[
        list[str] | None,
        typer.Option("--join", "-j", help="An aggregator's status page URL or multiaddr to test; repeatable."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed for each network step.", min=1)] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Pre-flight check: p2pd starts, the join address answers, reachability, link rates, device, disk."""
    from potluck.cli.preflight import run_doctor  # asyncio and the probe's wire: not for --help

    raise typer.Exit(run_doctor(join=list(join or []), as_json=as_json, timeout_s=timeout))
