"""`potluck keygen` and `potluck whoami`: a node's Ed25519 key, whose fingerprint is its name on the leaderboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from potluck.cli.common import DEFAULT_IDENTITY, stdout


def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the private key (mode 0600).")] = (
        DEFAULT_IDENTITY
    ),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key (its identity is lost).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {path, fingerprint, public_key} as JSON.")] = False,
) -> None:
    """Create this node's Ed25519 identity: its fingerprint is your name on the leaderboard."""
    from potluck.protocol.identity import generate_identity, save_identity

    path = out.expanduser()
    identity = generate_identity()
    save_identity(identity, path, overwrite=force)
    if as_json:
        print(
            json.dumps(
                {"path": str(path), "fingerprint": identity.fingerprint, "public_key": identity.public_key.hex()}
            )
        )
    else:
        stdout.print(f"wrote {path}\nfingerprint {identity.fingerprint}\npublic key  {identity.public_key.hex()}")


def whoami(
    identity: Annotated[Path, typer.Option("--identity", "-i", help="The private key file to read.")] = (
        DEFAULT_IDENTITY
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print {path, fingerprint, public_key} as JSON.")] = False,
) -> None:
    """Show the fingerprint and public key of an existing identity (checks the key file as a node would)."""
    from potluck.protocol.identity import load_identity

    path = identity.expanduser()
    loaded = load_identity(path)
    if as_json:
        print(
            json.dumps({"path": str(path), "fingerprint": loaded.fingerprint, "public_key": loaded.public_key.hex()})
        )
    else:
        stdout.print(f"{path}\nfingerprint {loaded.fingerprint}\npublic key  {loaded.public_key.hex()}")

