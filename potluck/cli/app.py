"""The `potluck` command: its typer app, its logging, and the one place an error becomes a line on the terminal.

Each command family has a module of its own under potluck.cli, which imports only downward (common, flags,
status lines, process helpers); this module is the top and registers them all. Commands import the library
(torch, hivemind, the protocol's config) inside their bodies, so `potluck --help` loads little more than typer.
A PotluckError (the one base of the library's one-line errors) becomes `potluck: error: ...` and exit status 2
instead of a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Annotated

import typer
from rich.logging import RichHandler

from potluck import __version__
from potluck.cli import (
    aggregator,
    bans,
    doctor,
    export,
    identity,
    ledger,
    peer,
    planning,
    redteam,
    serverless,
    swarm,
    tokenizer,
)
from potluck.cli.common import stderr, stdout
from potluck.cli.log_limit import RepeatFilter
from potluck.errors import ERROR_PREFIX, PotluckError
from potluck.protocol import PROTOCOL_VERSION

app = typer.Typer(
    name="potluck",
    help="Train one model together on volunteers' GPUs over ordinary internet links.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
app.command("keygen")(identity.keygen)
app.command("whoami")(identity.whoami)
app.command("simulate")(planning.simulate)
app.command("plan")(planning.plan)
app.command("aggregator")(aggregator.aggregator)
app.command("peer")(peer.peer)
app.command("swarm")(swarm.swarm)
app.command("doctor")(doctor.doctor)
app.command("status")(serverless.status)
app.add_typer(bans.bans_app, name="bans")
app.command("redteam")(redteam.redteam)
app.add_typer(ledger.ledger_app, name="ledger")
app.add_typer(ledger.receipts_app, name="receipts")
app.command("leaderboard")(ledger.leaderboard)
app.command("export")(export.export)
app.command("sample")(export.sample)
app.add_typer(tokenizer.tokenizer_app, name="tokenizer")


def setup_logging(verbose: bool) -> None:
    """Logs to stderr: rich on a terminal, one plain line per record otherwise (log files, docker logs, tests).

    INFO with --verbose, else WARNING. A line repeated from one place in the code is shown a few times
    per window, then counted (potluck.cli.log_limit), so a flood of errors cannot fill the disk. Only entry points
    call this.
    """
    if stderr.is_terminal:
        handler: logging.Handler = RichHandler(console=stderr, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"potluck {__version__} (protocol v{PROTOCOL_VERSION})")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each step is doing.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train one model together on volunteers' GPUs over ordinary internet links."""
    setup_logging(verbose)


def handle_errors(run: Callable[[], object]) -> None:
    """Run an app, turning a PotluckError into its one line and exit status (2), Ctrl-C into exit status 130."""
    try:
        run()
    except SystemExit:
        raise  # --help, usage errors and every normal exit: nothing to translate
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
    except PotluckError as err:  # one line the user can act on; anything else is a bug and keeps its traceback
        stderr.print(f"{ERROR_PREFIX}{err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(err.exit_status)


def main() -> None:
    """The `potluck` console script."""
    handle_errors(app)


def single_command_main(command: Callable[..., None], name: str) -> Callable[[], None]:
    """A console-script entry point running one command (`peer`, `aggregator-server`) with potluck's error handling."""

    def main() -> None:
        setup_logging(False)
        single = typer.Typer(name=name, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
        single.command(name=name)(command)
        handle_errors(lambda: single(prog_name=name))

    return main


def peer_main() -> None:
    """The `peer` console script."""
    single_command_main(peer.peer, "peer")()


def aggregator_main() -> None:
    """The `aggregator-server` console script."""
    single_command_main(aggregator.aggregator, "aggregator-server")()

