"""A peer of a run with no aggregator (`potluck peer --serverless`), its flags, and `potluck status` of such a run.

The serverless peers average among themselves through hivemind's all-reduce (potluck/peer/serverless.py).
Its flags are `ServerlessFlags`: what every peer takes, plus the run's config, which here no aggregator serves.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from potluck.cli.flags import flag
from potluck.cli.peer_flags import NodeFlags, listen_maddr
from potluck.cli.process import node_identity, prepare_node_process, run_until_stopped
from potluck.cli.status_lines import describe_serverless_event, printer

if TYPE_CHECKING:
    from potluck.peer.serverless import ServerlessOptions

# `peer --serverless` picks this command's flags (the switch is a `peer` flag: ServerlessFlags holds what follows it)
SERVERLESS_SWITCH = inspect.Parameter(
    "serverless",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=Annotated[
        bool,
        typer.Option(
            "--serverless",
            help="No aggregator: average with the other peers through hivemind's all-reduce and step locally "
            "(no validation of anyone's update: for peers that trust each other).",
        ),
    ],
    default=False,
)


class ServerlessFlags(NodeFlags):
    """What a serverless peer takes: the flags of every peer, and the run's config (no aggregator serves one)."""

    config: Annotated[
        Path | None,
        flag("--config", "-c", help="With --serverless: the run config. [default: the embedded tiny run]"),
    ] = None
    set_: Annotated[
        tuple[str, ...], flag("--set", help="With --serverless: override one config field; repeatable.")
    ] = ()

    def command(self) -> list[str]:
        """`peer --serverless` and its flags: what `python -m potluck` runs as this peer."""
        return ["peer", "--serverless", *self.argv()]

    def _overrides(self) -> dict[str, Any]:
        from potluck.protocol.config_files import parse_overrides

        overrides = parse_overrides(list(self.set_))
        if self.task is not None:
            overrides.setdefault("task.name", self.task)  # a run this peer starts trains the task it names
        return overrides

    def serverless_options(self) -> ServerlessOptions:
        """The node's options: the run's config read and checked, the --join addresses parsed."""
        # torch and hivemind: imported when a node starts, not for --help
        from potluck.peer.serverless import ServerlessOptions
        from potluck.protocol.config_files import run_config_or_default
        from potluck.protocol.node import parse_join_address
        from potluck.tasks import created
        from potluck.training.device import pick_device

        for address in self.join:
            parse_join_address(address)  # a typo fails here, in one line, before anything starts
        return ServerlessOptions(
            cfg=created(run_config_or_default(self.config, overrides=self._overrides())),
            join=self.join,
            host_maddrs=(listen_maddr(self.host, self.port, self.join),),
            client_mode=self.client_mode,
            data=self.data,
            device=pick_device(self.device),
            batch_size=self.batch_size,
            micro_batch=self.micro_batch,
            checkpointing=self.checkpointing,
            max_rounds=self.max_rounds,
            speed=self.speed,
        )


def run_serverless_peer(flags: ServerlessFlags) -> None:
    """`peer --serverless`: run a peer of a run with no aggregator until its last round, Ctrl-C or SIGTERM."""
    from potluck.peer.serverless import ServerlessPeer  # torch and hivemind
    from potluck.tasks import allow_task

    if flags.task is not None:
        allow_task(flags.task)
    options = flags.serverless_options()
    prepare_node_process(flags.threads, return_memory=flags.return_memory)
    runner = ServerlessPeer(
        node_identity(flags.identity), options, on_event=printer(flags.as_json, describe_serverless_event)
    )
    run_until_stopped(runner.run())


def status(
    join: Annotated[
        list[str], typer.Option("--join", "-j", help="A serverless peer's multiaddr (as it printed it); repeatable.")
    ],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the DHT.", min=1)] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """A serverless run's state, read from the DHT: its peers' rounds and held-out losses (it has no status page)."""
    # hivemind: imported when the command runs, not for --help
    from potluck.peer.serverless import serverless_status
    from potluck.protocol.node import parse_join_address

    for address in join:
        parse_join_address(address)
    runs = serverless_status(join, timeout_s=timeout)
    if as_json:
        print(json.dumps({"runs": runs}))
        return
    if not runs:
        print("no serverless run on this DHT (a peer's record appears after its first round)")
        return
    for run, peers in sorted(runs.items()):
        newest = peers[0]
        print(
            f"run {run!r}: {len(peers)} peer(s); newest record: round {newest['round']} of {newest['rounds']}, "
            f"held-out loss {newest['val_loss']:.4f}"
        )
        for p in peers:
            age = time.time() - p["time_s"]
            print(f"  {p['peer']}  round {p['round']}  loss {p['val_loss']:.4f}  group {p['group']}  {age:.0f} s ago")
