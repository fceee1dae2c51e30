"""The options a peer takes, declared once: `potluck peer` parses them, `potluck swarm` renders them for its peers.

`NodeFlags` holds what every peer takes; `PeerFlags` adds what a peer of a run with aggregators takes and
converts to the node's own record, `potluck.peer.options.PeerOptions`. The serverless peer's flags live with
that command (`potluck.cli.serverless`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, field_validator, model_validator

from potluck.cli.common import DEFAULT_IDENTITY, DEFAULT_RECEIPTS
from potluck.cli.flags import Flags, flag
from potluck.protocol.config import check_data_source
from potluck.protocol.identity import public_key_from_hex

if TYPE_CHECKING:
    from potluck.peer.options import PeerOptions


def listen_maddr(host: str | None, port: int, joins: tuple[str, ...]) -> str:
    """Where a peer listens: `host`, else loopback when it joins only loopback addresses, else every interface."""
    loopback = bool(joins) and all(a.startswith(("/ip4/127.", "/ip6/::1/")) for a in joins)
    return f"/ip4/{host or ('127.0.0.1' if loopback else '0.0.0.0')}/tcp/{port}"


class NodeFlags(Flags):
    """What every peer takes, with an aggregator or without."""

    join: Annotated[
        tuple[str, ...],
        flag(
            "--join",
            "-j",
            help="The aggregator's status page (http://HOST:8000) or multiaddr (as it printed it); repeatable. "
            "With --serverless: another peer's multiaddr (none: this peer starts the run).",
        ),
    ] = ()
    identity: Annotated[Path, flag("--identity", "-i", help="Ed25519 key, created on first run.")] = DEFAULT_IDENTITY
    data: Annotated[
        str | None,
        flag(
            "--data",
            help="Train on your own text: a text file, a directory, a .jsonl or .parquet file (its "
            "text in the run's data.text_field) or hf:<dir>. [default: the run's data.source]",
        ),
    ] = None
    task: Annotated[
        str | None,
        flag(
            "--task",
            help="The run's task when it is one of its operator's own: package.module:attribute, imported from "
            "your Python installation (install its package first; no code ever comes with a run).",
        ),
    ] = None
    device: Annotated[str, flag("--device", help="auto, cpu, cuda or cuda:N.")] = "auto"
    batch_size: Annotated[
        int | None, Field(ge=1), flag("--batch-size", help="Sequences per inner step. [default: the run's]")
    ] = None
    micro_batch: Annotated[
        int | None,
        Field(ge=1),
        flag(
            "--micro-batch",
            help="Sequences through the model at a time (gradient accumulation): a smaller GPU, the same step.",
        ),
    ] = None
    checkpointing: Annotated[
        bool, flag("--checkpointing", help="Recompute activations in the backward pass: less memory, more compute.")
    ] = False
    return_memory: Annotated[
        bool,
        flag(
            "--return-memory",
            help="Give a step's large freed tensors back to the system at once (Linux): on a CPU, a peak about "
            "10% lower, as `potluck plan --memory` estimates it, for steps about 15% slower.",
        ),
    ] = False
    max_rounds: Annotated[
        int | None, Field(ge=1), flag("--max-rounds", help="Leave cleanly after this many rounds.")
    ] = None
    client_mode: Annotated[bool, flag("--client-mode", help="Behind NAT: dial out only, accept no connections.")] = (
        False
    )
    port: Annotated[int, Field(ge=0, le=65535), flag("--port", help="TCP port to listen on (0: any).")] = 0
    host: Annotated[
        str | None,
        flag("--host", help="Address to listen on. [default: 127.0.0.1 when every --join is on it, else 0.0.0.0]"),
    ] = None
    threads: Annotated[
        int | None, Field(ge=1), flag("--threads", help="CPU threads for torch. [default: torch's]")
    ] = None
    speed: Annotated[
        float,
        Field(ge=0.01, le=1.0),
        flag(
            "--speed",
            help="Testing aid: run each inner step at this fraction of full speed (0.25: four times as long).",
        ),
    ] = 1.0
    as_json: Annotated[bool, flag("--json", help="One JSON object per event on stdout.")] = False

    @field_validator("data")
    @classmethod
    def _data_is_a_source(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_data_source(value)
        except ValueError as e:
            raise ValueError(f"--data {value!r}: {e}") from None


class PeerFlags(NodeFlags):
    """What a peer of a run with aggregators takes (`potluck peer`, and each peer `potluck swarm` starts)."""

    run: Annotated[str | None, flag("--run", help="Which run to join when the DHT carries several.")] = None
    aggregator_key: Annotated[
        tuple[str, ...],
        flag(
            "--aggregator-key",
            help="Trust only this aggregator key (64 hex characters, from the run's operator); repeatable. "
            "[default: the key of the --join aggregator, else the keys pinned beside --identity at first join]",
        ),
    ] = ()
    tokenizer: Annotated[
        Path | None,
        flag(
            "--tokenizer",
            help="The tokenizer.json you bring (say, the one your --data was prepared with): a run with another "
            "tokenizer is refused before anything is downloaded. [default: the run's, which comes with its state]",
        ),
    ] = None
    reconnect_timeout: Annotated[
        float,
        Field(ge=1),
        flag("--reconnect-timeout", help="Give up after this many seconds without the aggregator."),
    ] = 300.0
    join_timeout: Annotated[
        float, Field(ge=1), flag("--join-timeout", help="Seconds to wait for the --join address to answer.")
    ] = 30.0
    receipts: Annotated[
        Path, flag("--receipts", help="Keep the aggregator's signed receipts here (potluck receipts verify).")
    ] = DEFAULT_RECEIPTS
    http_port: Annotated[
        int,
        Field(ge=0, le=65535),
        flag("--http-port", help="Serve this peer's own status (JSON) on this port (0: none)."),
    ] = 0
    http_host: Annotated[str, flag("--http-host", help="Address of this peer's status page.")] = "127.0.0.1"
    overlap: Annotated[
        bool,
        flag(
            "--overlap/--no-overlap",
            help=(
                "Keep training while an update is in flight (from a guess of the next state) and merge the "
                "aggregate when it arrives: worth it where communication is a real part of a round."
            ),
        ),
    ] = False
    overlap_limit: Annotated[
        float,
        Field(ge=0.01, le=1.0),
        flag(
            "--overlap-limit",
            help=(
                "With --overlap: at most this share of a round's inner steps run before the round's state "
                "arrives; then training waits for it (1: no limit). An update trained wholly ahead of its state "
                "fails the aggregator's held-out check now and then (docs/experiments/overlap.md)."
            ),
        ),
    ] = 1.0
    plan: Annotated[
        bool,
        flag(
            "--plan/--no-plan",
            help="At start-up, time a few inner steps and probe the link to the aggregator (~2 s), then log the "
            "scaling efficiency K the run's settings give here and the local steps that would give K >= 0.9.",
        ),
    ] = False
    plan_peers: Annotated[
        int, Field(ge=1), flag("--plan-peers", help="Peers the start-up plan assumes for He et al.'s formula.")
    ] = 8
    eval_batches: Annotated[
        int,
        Field(ge=0),
        flag(
            "--eval-batches",
            help="After each round, score the model on this many of the run's held-out batches and print the "
            "loss (0: never). In a sharded run no aggregator holds the whole model, so a peer is where it is scored.",
        ),
    ] = 0
    serve_state: Annotated[
        bool,
        flag(
            "--serve-state/--no-serve-state",
            help="Serve chunks of the model state this peer holds to peers that join later, so no one source "
            "uploads the whole model to every joiner (never in --client-mode: nobody can dial in).",
        ),
    ] = True

    @field_validator("aggregator_key")
    @classmethod
    def _keys_are_hex(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        keys = tuple(v.strip().lower() for v in values)
        for value, key in zip(values, keys, strict=True):
            try:
                public_key_from_hex(key)
            except ValueError:
                raise ValueError(f"--aggregator-key {value!r:.80}: a key is 64 hex characters") from None
        return keys

    @model_validator(mode="after")
    def _overlap_limit_needs_overlap(self) -> PeerFlags:
        if self.overlap_limit < 1 and not self.overlap:
            raise ValueError("--overlap-limit only applies with --overlap")
        return self

    def command(self) -> list[str]:
        """`peer` and its flags: what `python -m potluck` runs as this peer."""
        return ["peer", *self.argv()]

    def peer_options(self, *, join: tuple[str, ...], tokenizer: str | None = None) -> PeerOptions:
        """The node's options, given the multiaddrs the --join addresses resolved to (a status page is asked).

        `tokenizer`: the sha256 of the --tokenizer file, once read and checked.
        """
        from potluck.peer.inner_state import state_file
        from potluck.peer.options import PeerOptions  # torch: only a peer that runs needs it, not --help
        from potluck.peer.trust import pin_file
        from potluck.training.device import pick_device

        return PeerOptions(
            join=join,
            host_maddrs=(listen_maddr(self.host, self.port, join),),
            client_mode=self.client_mode,
            run=self.run,
            aggregator_keys=self.aggregator_key,
            trust_file=pin_file(self.identity.expanduser()),
            inner_state_file=state_file(self.identity.expanduser()),
            data=self.data,
            tokenizer=tokenizer,
            device=pick_device(self.device),
            batch_size=self.batch_size,
            micro_batch=self.micro_batch,
            checkpointing=self.checkpointing,
            max_rounds=self.max_rounds,
            reconnect_timeout_s=self.reconnect_timeout,
            join_timeout_s=self.join_timeout,
            receipts_dir=self.receipts.expanduser(),
            overlap=self.overlap,
            overlap_limit=self.overlap_limit,
            speed=self.speed,
            plan=self.plan,
            plan_peers=self.plan_peers,
            eval_batches=self.eval_batches,
            serve_state=self.serve_state,
        )
