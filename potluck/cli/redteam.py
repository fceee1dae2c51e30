"""`potluck redteam`: a local swarm with misbehaving peers, against the same swarm clean and undefended; or an honest
swarm with an attacker from outside the run (a network attack), against the same swarm calm."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from potluck.cli.common import UsageError, stderr, stdout
from potluck.events import Event, RoundClosed

# the names only: potluck.lab.redteam.network imports torch and hivemind, which --help does not need
NETWORK_ATTACK_NAMES = (
    "silent-streams",
    "unread-replies",
    "dht-strangers",
    "fake-joiners",
    "stranger-uploads",
    "http-flood",
)


def redteam(
    attack: Annotated[
        str,
        typer.Option(
            help="A peer's misbehaviour: nan, noise, scaled, sign-flip, zero, stale, replay, forged, wrong-base, "
            "alie, ipm, label-flip, copycat, sybil or bitflip. Or a network attack from outside the run, against "
            "the aggregator of an honest swarm: " + ", ".join(NETWORK_ATTACK_NAMES) + " (--adversaries and "
            "--strength do not apply; the report compares round times and honest uploads with a calm run)."
        ),
    ],
    peers: Annotated[int, typer.Option(help="Peers in all, adversaries included.", min=2, max=64)] = 8,
    adversaries: Annotated[int, typer.Option(help="How many of them misbehave.", min=1)] = 2,
    rounds: Annotated[int, typer.Option(help="Outer rounds per run.", min=1)] = 6,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Inner steps per round.", min=1)] = 10,
    strength: Annotated[
        float, typer.Option(help="Scales the attack (see potluck/lab/redteam/attacks.py).", min=0.0)
    ] = 1.0,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override one config field, e.g. --set aggregation.kind=centered-clip; repeatable."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Stop a run after this many seconds.", min=1)] = 1800.0,
    calm_after: Annotated[
        bool,
        typer.Option(
            help="Network attacks: time the swarm calm again after the attacked run, and bound the attacked "
            "round time by the slower calm run (a shared machine's load drifts between runs)."
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """RED TEAM: a local swarm with misbehaving peers, against the same swarm clean (and undefended); or an honest
    swarm with a network attacker against its aggregator, against the same swarm calm."""
    # torch and hivemind: imported when the runs start, not for --help
    from potluck.lab.children import sigterm_unwinds
    from potluck.lab.redteam.harness import run_redteam, to_json, verdict
    from potluck.protocol.config import RunConfig
    from potluck.protocol.config_files import parse_overrides

    overrides: dict[str, Any] = {
        "rounds": rounds,
        "local_steps": local_steps,
        "inner.warmup_steps": min(10, rounds * local_steps),
    }
    cfg = RunConfig().with_overrides({**overrides, **parse_overrides(set_ or [])}, source="flags")
    if attack in NETWORK_ATTACK_NAMES:
        _network(cfg, attack=attack, peers=peers, timeout=timeout, calm_after=calm_after, as_json=as_json)
        return
    done: dict[str, int] = {}

    def on_event(run: str, child: str, event: Event) -> None:
        if child == "aggregator" and isinstance(event, RoundClosed):
            done[run] = event.round + 1
            stderr.print(f"{run:>10}: round {done[run]}/{cfg.rounds}, held-out loss {event.val_loss:.4f}")

    try:
        with sigterm_unwinds():  # each swarm stops its children, and SIGTERM between two swarms starts no next one
            report = run_redteam(
                cfg,
                attack=attack,
                peers=peers,
                adversaries=adversaries,
                strength=strength,
                timeout_s=timeout,
                on_event=on_event,
            )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if as_json:
        print(to_json(report))
        return
    table = Table(title=f"attack {attack}: {adversaries} of {peers} peers, {report['rounds']} rounds")
    for column in ("", "value"):
        table.add_column(column, justify="right")
    rate = lambda r: "-" if r is None else f"{r:.0%}"  # noqa: E731
    table.add_row(
        "adversarial uploads rejected",
        f"{report['adversarial_rejected']}/{report['adversarial_updates']} ({rate(report['tpr'])})",
    )
    table.add_row(
        "honest uploads rejected", f"{report['honest_rejected']}/{report['honest_updates']} ({rate(report['fpr'])})"
    )
    table.add_row("final held-out loss", f"{report['final_val_loss']:.4f} ({report['loss_vs_clean']:+.1%} vs clean)")
    table.add_row("clean run", f"{report['clean_final_val_loss']:.4f}")
    if report.get("undefended_diverged"):
        table.add_row("undefended (plain mean)", "diverged")
    elif "undefended_final_val_loss" in report:
        table.add_row(
            "undefended (plain mean)",
            f"{report['undefended_final_val_loss']:.4f} ({report['undefended_loss_vs_clean']:+.1%})",
        )
    stdout.print(table)
    stdout.print("  ".join(f"{name}: {'ok' if ok else 'NOT MET'}" for name, ok in verdict(report).items()))


def _network(cfg: Any, *, attack: str, peers: int, timeout: float, calm_after: bool, as_json: bool) -> None:
    """`--attack <network attack>`: the honest swarm calm, then under the attack; a table or one JSON object."""
    import json

    from potluck.lab.children import sigterm_unwinds
    from potluck.lab.redteam.network import network_to_json_ready, run_network_redteam

    def on_event(run: str, child: str, event: Event) -> None:
        if child == "aggregator" and isinstance(event, RoundClosed):
            stderr.print(
                f"{run:>10}: round {event.round + 1}/{cfg.rounds} in {event.round_s:.1f} s ({event.closed_by})"
            )

    with sigterm_unwinds():  # each swarm stops its children (and the attacker), and SIGTERM starts no next swarm
        report = run_network_redteam(
            cfg, attack=attack, peers=peers, calm_after=calm_after, timeout_s=timeout, on_event=on_event
        )
    if as_json:
        print(json.dumps(network_to_json_ready(report)))
        return
    print_network_report(report, rounds=cfg.rounds)


def print_network_report(report: dict[str, Any], *, rounds: int) -> None:
    """A network attack's report as a table, calm beside attacked, then the attacker's counters and the verdict."""
    from potluck.lab.redteam.network import network_verdict

    title = f"network attack {report['attack']} ({report['what']}): {report['peers']} honest peers, {rounds} rounds"
    table = Table(title=title)
    runs = [run for run in ("calm", "attacked", "calm_after") if report.get(run)]
    for column in ("", *runs):
        table.add_column(column.replace("_", " "), justify="right")
    seconds = lambda s: "-" if s is None else f"{s:.2f} s"  # noqa: E731
    deadlines = lambda row: f"{row['closed_by_deadline']} {row['deadline_rounds'] or ''}".strip()  # noqa: E731
    table.add_row("rounds", *(str(report[run]["rounds"]) for run in runs))
    table.add_row("median round time", *(seconds(report[run]["median_round_s"]) for run in runs))
    table.add_row("closed by deadline (rounds)", *(deadlines(report[run]) for run in runs))
    for key in ("honest_accepted", "honest_rejected"):
        table.add_row(key.replace("_", " "), *(str(report[run][key]) for run in runs))
    ratio = report["round_time_ratio"]
    ratio_row = ["" for _ in runs]
    ratio_row[1] = "-" if ratio is None else f"{ratio:.2f}x"
    table.add_row("round time, attacked / slower calm", *ratio_row)
    stdout.print(table)
    stdout.print("attacker: " + (", ".join(f"{k} {v}" for k, v in report["attacker"].items()) or "no counters"))
    stdout.print("  ".join(f"{name}: {'ok' if ok else 'NOT MET'}" for name, ok in network_verdict(report).items()))
