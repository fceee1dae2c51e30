"""`potluck ledger verify|export`, `potluck leaderboard`, `potluck receipts verify`: the incentives, offline.

Nothing here writes to the ledger: every command opens it read-only, so it is safe beside a running
aggregator.
"""

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from potluck.cli.common import DEFAULT_RECEIPTS, DEFAULT_STATE_DIR, UsageError
from potluck.cli.flags import as_written

ledger_app = typer.Typer(help="Check and export an aggregator's contribution ledger.", no_args_is_help=True)

_DB_HELP = as_written("The ledger file. [default: STATE_DIR/ledger.sqlite]")


def _db_path(db: Path | None, state_dir: Path) -> Path:
    """The ledger file to read; a one-line UsageError when there is none (never creates one)."""
    path = (db or state_dir / "ledger.sqlite").expanduser()
    if not path.is_file():
        raise UsageError(f"no ledger at {path}; pass --db PATH or the aggregator's --state-dir")
    return path


def _open(path: Path):  # noqa: ANN202 - a Ledger, imported lazily
    """The ledger at `path`, read-only (a running aggregator keeps writing it); UsageError if it is not one."""
    from potluck.incentives.ledger import Ledger, LedgerError

    try:
        return Ledger.open(path, read_only=True)
    except LedgerError as e:
        raise UsageError(str(e)) from None


@ledger_app.command("verify")
def verify(
    db: Annotated[Path | None, typer.Option("--db", help=_DB_HELP)] = None,
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The aggregator's state directory.")] = (
        DEFAULT_STATE_DIR
    ),
    key: Annotated[
        str | None,
        typer.Option(
            help=as_written("The aggregator's public key (64 hex). [default: the key its first signed head names]")
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Walk the hash chain and the signed round heads; exit 1 naming the first bad row or head."""
    from potluck.incentives.ledger import LedgerError
    from potluck.incentives.ledger_verify import verify_ledger
    from potluck.protocol.identity import fingerprint, public_key_from_hex

    path = _db_path(db, state_dir)
    pinned = key is not None
    if key is not None:
        try:
            public_key = public_key_from_hex(key)
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        with _open(path) as ledger:
            heads = ledger.heads()
        if not heads:
            raise UsageError(f"{path} has no signed head yet: nothing to verify against")
        public_key = heads[0].aggregator_public_key
    try:
        report = verify_ledger(path, public_key)
    except LedgerError as e:
        raise UsageError(str(e)) from None
    if as_json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "aggregator": fingerprint(public_key),
                    "key_pinned": pinned,
                    "rows_checked": report.rows_checked,
                    "heads_checked": report.heads_checked,
                    "problem": report.problem.value if report.problem else None,
                    "row_id": report.row_id,
                    "round": report.round,
                    "message": report.message,
                }
            )
        )
    elif report.ok:
        trust = "" if pinned else " (the key its first head names; pass --key to pin it)"
        print(
            f"ok: {report.rows_checked} row(s) and {report.heads_checked} signed head(s) check out against "
            f"aggregator {fingerprint(public_key)}{trust}"
        )
    else:
        print(f"BAD: {report.message}")
    if not report.ok:
        raise typer.Exit(1)


@ledger_app.command("export")
def export(
    db: Annotated[Path | None, typer.Option("--db", help=_DB_HELP)] = None,
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The aggregator's state directory.")] = (
        DEFAULT_STATE_DIR
    ),
    fmt: Annotated[Literal["csv", "json"], typer.Option("--format", help="csv or json.")] = "csv",
) -> None:
    """Every row of the ledger on stdout, keys and hashes as hex."""
    from potluck.incentives.ledger import export_rows

    with _open(_db_path(db, state_dir)) as ledger:
        print(export_rows(ledger, fmt), end="")


def leaderboard(
    db: Annotated[Path | None, typer.Option("--db", help=_DB_HELP)] = None,
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The aggregator's state directory.")] = (
        DEFAULT_STATE_DIR
    ),
    limit: Annotated[int, typer.Option(help="Show the top N.", min=1)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Points per volunteer key, highest first (credit per potluck/incentives/scoring.py)."""
    from potluck.protocol.identity import fingerprint

    with _open(_db_path(db, state_dir)) as ledger:
        points = ledger.points()
        accepted = ledger.accepted_counts()
    ranked = sorted(points.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    board = [
        {"rank": i + 1, "fingerprint": fingerprint(k), "points": p, "accepted_updates": accepted.get(k, 0)}
        for i, (k, p) in enumerate(ranked)
    ]
    if as_json:
        print(json.dumps({"leaderboard": board}))
        return
    if not board:
        print("no contributions yet")
    for b in board:
        print(f"{b['rank']:>3}. {b['fingerprint']}  {b['points']:>14,.0f} points  {b['accepted_updates']} accepted")


receipts_app = typer.Typer(help="Check the receipts your peer kept, offline.", no_args_is_help=True)


@receipts_app.command("verify")
def receipts_verify(
    receipts: Annotated[
        Path, typer.Option("--receipts", help="Where the peer kept them (its --receipts).")
    ] = DEFAULT_RECEIPTS,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key", help=as_written("A trusted aggregator public key (64 hex); repeatable. [default: as signed]")
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Check each receipt's signature and Merkle proof against its signed aggregate; exit 1 if any fails."""
    from potluck.incentives.receipts import verify_receipts
    from potluck.protocol.identity import public_key_from_hex

    try:
        keys = None if not key else {public_key_from_hex(k) for k in key}
    except ValueError as e:
        raise UsageError(str(e)) from None
    root = receipts.expanduser()
    if not root.is_dir():
        raise UsageError(f"no receipts at {root}; pass the peer's --receipts directory")
    checks = verify_receipts(root, aggregator_keys=keys)
    bad = [c for c in checks if c.problem is not None]
    if as_json:
        rows = [
            {
                "path": str(c.path),
                "run": c.run_id,
                "round": c.round,
                "accepted": c.accepted,
                "tokens_credited": c.tokens_credited,
                "score": c.score,
                "aggregator": c.aggregator,
                "ok": c.problem is None,
                "problem": c.problem,
            }
            for c in checks
        ]
        ok = sum(c.problem is None for c in checks)
        points = sum(c.score for c in checks if c.problem is None)
        print(json.dumps({"ok": not bad, "checked": len(checks), "verified": ok, "points": points, "receipts": rows}))
    else:
        for c in checks:
            what = f"{c.tokens_credited:,} tokens, {c.score:,.0f} points" if c.accepted else "rejected"
            verdict = "ok " if c.problem is None else f"BAD ({c.problem})"
            print(f"{verdict:<4} run {c.run_id} round {c.round}: {what}, signed by {c.aggregator}")
        trust = "" if keys else " (each against the key it names; pass --key to pin the aggregator)"
        print(f"{len(checks) - len(bad)} of {len(checks)} receipt(s) verify{trust}")
    if bad or not checks:
        raise typer.Exit(1)
