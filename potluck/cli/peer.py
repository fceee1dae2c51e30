"""`potluck peer` (and the `peer` script): a volunteer joins a run, trains, and sends its updates until the run ends.

Its flags are `PeerFlags` (potluck.cli.peer_flags), declared once there; with `--serverless` they are
`ServerlessFlags` instead (potluck.cli.serverless), a peer of a run that has no aggregator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from potluck.cli.common import UsageError
from potluck.cli.flags import takes
from potluck.cli.peer_flags import PeerFlags
from potluck.cli.process import node_identity, prepare_node_process, run_until_stopped
from potluck.cli.serverless import SERVERLESS_SWITCH, ServerlessFlags, run_serverless_peer
from potluck.cli.status_lines import describe_peer_event, printer

if TYPE_CHECKING:
    from potluck.events import Event
    from potluck.peer.runner import PeerRunner
    from potluck.tasks import Task

# The order `peer --help` has always listed its flags in: PeerFlags' own and the shared ones mixed, --serverless,
# what only ServerlessFlags takes, --json.
_HELP_ORDER = (
    *("join", "identity", "data", "task", "tokenizer", "device", "batch_size", "micro_batch", "checkpointing"),
    "return_memory",
    *("max_rounds", "client_mode", "run", "aggregator_key", "port", "host"),
    *("threads", "reconnect_timeout", "join_timeout", "receipts", "http_port", "http_host", "overlap"),
    *("overlap_limit", "speed", "plan", "plan_peers", "eval_batches", "serve_state", "serverless", "config", "set_"),
    "as_json",
)


def _parameters() -> list[inspect.Parameter]:
    """`peer`'s flags: PeerFlags' fields, --serverless, and what only ServerlessFlags takes."""
    parameters = {**ServerlessFlags.parameters(), **PeerFlags.parameters(), "serverless": SERVERLESS_SWITCH}
    assert set(parameters) == set(_HELP_ORDER), set(parameters) ^ set(_HELP_ORDER)
    return [parameters[name] for name in _HELP_ORDER]


@takes(_parameters())
def peer(**values: Any) -> None:
    """Volunteer: join a run, train locally, send compressed signed updates, apply the aggregates (peer)."""
    serverless = values.pop("serverless")
    own = {name: value for name, value in values.items() if name in PeerFlags.model_fields}
    flags = PeerFlags.parsed(own)
    if serverless:
        if flags.overlap:
            raise UsageError(
                "--overlap does not apply with --serverless: "
                "a serverless peer averages its state at the end of each round"
            )
        shared = {name: value for name, value in values.items() if name in ServerlessFlags.model_fields}
        run_serverless_peer(ServerlessFlags.parsed(shared))
        return
    if values["config"] is not None or values["set_"]:
        raise UsageError("--config and --set only apply with --serverless: a run with an aggregator uses its config")
    run_peer(flags)


def run_peer(flags: PeerFlags) -> None:
    """Run a peer of a run with aggregators until it leaves, the run ends, Ctrl-C or SIGTERM."""
    emit_line = printer(flags.as_json, describe_peer_event)
    _, main = peer_node(flags, on_event=emit_line)
    run_until_stopped(main)


def peer_node(
    flags: PeerFlags, *, on_event: Callable[[Event], None], task: Task | None = None
) -> tuple[PeerRunner, Coroutine[Any, Any, None]]:
    """The peer `flags` describe and the coroutine that runs it (with its status page when asked).

    What `potluck peer` runs and what `potluck.Peer` runs in its thread. `task`: the object to run as
    `flags.task` (not imported).
    """
    # torch and hivemind: imported when a node starts, not for --help
    from potluck.cli.node_web import PageOptions, peer_app, peer_page, serve_with_page
    from potluck.peer.join_url import resolve_joins
    from potluck.peer.runner import PeerRunner, join_addresses
    from potluck.tasks import allow_task
    from potluck.tasks.tokens import brought_tokenizer

    if flags.task is not None:
        allow_task(flags.task, task)
    tokenizer = None if flags.tokenizer is None else brought_tokenizer(flags.tokenizer)
    addresses = join_addresses(resolve_joins(list(flags.join), timeout_s=flags.join_timeout))
    prepare_node_process(flags.threads, return_memory=flags.return_memory)
    identity = node_identity(flags.identity)
    options = flags.peer_options(join=addresses, tokenizer=tokenizer)
    page = PageOptions(host=flags.http_host, port=flags.http_port)
    status, emit = peer_page(on_event=on_event)
    runner = PeerRunner(identity, options, on_event=emit)
    return runner, serve_with_page(runner.run(), peer_app(status), page, on_event=on_event)
