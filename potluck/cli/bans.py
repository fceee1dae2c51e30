"""`potluck bans list|add|lift`: an operator's hand on an aggregator's ban list, through its state directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from potluck.cli.common import DEFAULT_STATE_DIR, UsageError

bans_app = typer.Typer(help="List, add and lift bans of an aggregator's run (its --state-dir).", no_args_is_help=True)
_STATE_DIR_OPTION = typer.Option("--state-dir", help="The aggregator's state directory.")


def _resolve_key(reputation: Any, key: str) -> bytes:
    """A public key from 64 hex characters, or from a fingerprint the ban list already knows."""
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
    from potluck.aggregator_server.reputation import BANS_FILE, LEGACY_BANS_FILE, Ban, Reputation
    from potluck.protocol.identity import fingerprint

    state_dir = state_dir.expanduser()
    banned: list[Ban] = []
    struck: dict[bytes, list[int]] = {}
    if any((state_dir / name).is_file() for name in (BANS_FILE, LEGACY_BANS_FILE)):  # else create nothing there
        reputation = Reputation.open(state_dir)
        reputation.close()
        banned = list(reputation.bans.values())
        struck = {k: v for k, v in reputation.strikes.items() if k not in reputation.bans}
    bans: list[dict[str, Any]] = [
        {
            "fingerprint": fingerprint(b.public_key),
            "public_key": b.public_key.hex(),
            "reason": b.reason,
            "round": b.round,
        }
        for b in banned
    ]
    strikes = {fingerprint(k): v for k, v in struck.items()}
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
    try:
        public_key = _resolve_key(reputation, key)
        reputation.ban(public_key, reason=reason)
        reputation.flush()  # on disk before this says so; a running aggregator reloads on the commit
    finally:
        reputation.close()
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
    try:
        public_key = _resolve_key(reputation, key)
        lifted = reputation.lift(public_key)
        reputation.flush()
    finally:
        reputation.close()
    if not lifted:
        raise UsageError(f"{fingerprint(public_key)} is not banned")
    print(f"lifted the ban on {fingerprint(public_key)}")
