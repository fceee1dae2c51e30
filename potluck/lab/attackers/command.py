"""The command line every libp2p attacker starts from (red team only)."""

import argparse


def attacker_parser(module: str, description: str | None) -> argparse.ArgumentParser:
    """A parser for `python -m MODULE --join ADDR ...` that also takes what the lab's launchers pass every node.

    The launchers start attackers like peers, with `--threads N --json`; an attacker accepts and ignores
    both (its events are always JSON lines), so each attacker adds only its own options.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--join", required=True, help="the target aggregator's multiaddr")
    parser.add_argument("--threads", type=int, default=1, help="ignored (the launchers pass it to every node)")
    parser.add_argument("--json", action="store_true", help="ignored: events are always JSON lines")
    return parser
