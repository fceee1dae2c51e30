"""`potluck swarm`: one aggregator and N peers as real OS processes on 127.0.0.1, trained to the end of a run.

The same commands a volunteer runs (`python -m potluck aggregator ...`, `python -m potluck peer ...`)
are started as children, each in a session of its own so that it and its libp2p daemon form one
process group: stopping the swarm (done, failed, Ctrl-C or SIGTERM) signals every group, waits, and
kills what is left, so no `p2pd` outlives the swarm. Children report through JSON lines on stdout;
their logs go to files in the swarm's work directory, whose tail is shown when a child fails.
Children are forked from a fork server that has imported torch and hivemind once (potluck.lab.forkserver),
except inside the network lab, where each must start in its namespace.

On a machine with few cores the children share them: each gets `cores // (N + 1)` torch threads
(at least one), set through OMP_NUM_THREADS (and torch.set_num_threads in a forked child), so N+1
processes do not fight over the same cores.
"""

import contextlib
import functools
import logging
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from potluck.cli.aggregator import AggregatorFlags
from potluck.cli.peer_flags import PeerFlags
from potluck.cli.serverless import ServerlessFlags
from potluck.errors import DIVERGED_EXIT_STATUS, PotluckError
from potluck.events import (
    Adversarial,
    AggregatorReady,
    Event,
    Followed,
    PeerDone,
    PeerRound,
    PeerSynced,
    RoundClosed,
    ServerlessReady,
    ServerlessRound,
    ServerlessSynced,
    SwarmKilled,
    Takeover,
    encode_event,
)
from potluck.lab.children import (
    Child,
    last_log_line,
    pump,
    signal_group,
    sigterm_unwinds,
    start_child,
    stop_children,
    threads_per_process,
    why,
)
from potluck.lab.netlab import Link, NetLab
from potluck.protocol.config import BUILT_IN_TASKS, RunConfig
from potluck.protocol.config_files import dump_run_config
from potluck.protocol.identity import load_or_create_identity, public_key_to_hex
from potluck.tasks import created

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Event)

SHARDED_EVAL_BATCHES = 8  # held-out batches peer-0 scores in a sharded swarm (an aggregator's default)
SWARM_FAILOVER_S = 5.0  # a local standby takes over this soon: on 127.0.0.1 silence means the primary is gone
READY_TIMEOUT_S = 180.0  # the aggregator imports torch and hivemind, loads the corpus, starts p2pd
# Peers yield the cores to the aggregators, whose round close every peer waits on (potluck.lab.priority).
PEER_NICE = 10


class SwarmError(PotluckError):
    """The swarm could not run to the end (one line, with the failing child's last log line)."""


class SwarmDiverged(SwarmError):
    """A peer of the swarm stopped because its local training went non-finite."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmOptions:
    """What `potluck swarm` was asked for."""

    peers: int
    cfg: RunConfig
    # What every honest peer is started with (its own text, overlap, ...); the swarm adds where it joins, its key,
    # threads, receipts and speed. The run's data.source already says what the aggregator evaluates on.
    peer: PeerFlags = PeerFlags()
    state_dir: Path | None = None  # the aggregator's; a temporary one when None
    timeout_s: float = 1800.0
    threads_per_process: int | None = None  # None: cores // (peers + 1)
    http_port: int = 0  # the aggregator's status page on 127.0.0.1 (0: none)
    # Red team only: the last `adversaries` peers run `python -m potluck.lab.redteam peer ... ADVERSARY_ARGS`.
    adversaries: int = 0
    adversary_args: tuple[str, ...] = ()
    # Each process in its own network namespace, peers behind `link` and the aggregator behind
    # `aggregator_link` (potluck.lab.netlab; root and iproute2). None: everything on 127.0.0.1.
    link: Link | None = None
    aggregator_link: Link = Link(up_bits_per_s=10**9, down_bits_per_s=10**9)
    # Testing aid: peer i runs its inner steps at peer_speeds[i] of full speed (missing: 1.0).
    peer_speeds: tuple[float, ...] = ()
    # No aggregator: peer-0 starts the run and the others join it, each started with these (`peer --serverless`).
    serverless: ServerlessFlags | None = None
    # Above 1: the run's parameters are cut into this many shards, each with an aggregator of its own
    # (protocol/shards.py); peer-0 scores the held-out loss, which no shard's aggregator can.
    aggregators: int = 1
    # Each shard also gets a standby aggregator that follows its owner and takes over when it goes.
    standby: bool = False
    # Testing aid (with standby): SIGKILL aggregator-0 once its standby holds round N's result.
    kill_aggregator_at: int | None = None


@dataclass(kw_only=True, slots=True)
class SwarmResult:
    """What `--json` prints; see `to_dict`."""

    initial_val_loss: float
    final_val_loss: float
    rounds_completed: int
    aggregator_multiaddrs: list[str]
    num_params: int
    peers: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    wall_s: float
    aggregators: list[dict[str, Any]] = field(default_factory=list)  # each one's shard and ingest

    def to_dict(self) -> dict[str, Any]:
        """The `--json` object: the keys the issue names, plus per-round detail and timing."""
        return {
            "initial_val_loss": self.initial_val_loss,
            "final_val_loss": self.final_val_loss,
            "rounds_completed": self.rounds_completed,
            "aggregator_multiaddrs": self.aggregator_multiaddrs,
            "num_params": self.num_params,
            "peers": self.peers,
            "rounds": self.rounds,
            "wall_s": self.wall_s,
            "aggregators": self.aggregators,
        }


def _own_task(cfg: RunConfig) -> str | None:
    """The run's task when it is a task of its operator's own (every node must be told to import it)."""
    return None if cfg.task.name in BUILT_IN_TASKS else cfg.task.name


def run_swarm(options: SwarmOptions, *, on_event: Callable[[str, Event], None]) -> SwarmResult:
    """Start the aggregator, then the peers; follow their events until the run ends; stop every child.

    Every child is stopped however the swarm ends: done, failed, past `timeout_s`, Ctrl-C or SIGTERM
    (which unwinds like Ctrl-C while the swarm runs, then raises KeyboardInterrupt to the caller).

    `on_event(child_name, event)` sees every event (for live progress). SwarmError when a child
    fails, the aggregator does not get ready, or the run outlasts `timeout_s`.
    """
    started = time.monotonic()
    threads = options.threads_per_process or threads_per_process(options.peers)
    children: list[Child] = []
    events: queue.Queue[tuple[Child, Event | None]] = queue.Queue()
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_unwinds())  # its handler goes back last, once every child is stopped
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="potluck-swarm-")))
        lab = None
        shards = options.aggregators
        # the lab's first nodes are the aggregators: each shard's owner, then each shard's standby
        hubs = 0 if options.serverless is not None else shards * (2 if options.standby else 1)
        if options.link is not None:
            lab = stack.enter_context(NetLab([options.aggregator_link] * hubs + [options.link] * options.peers))
        stack.callback(stop_children, children)  # before the lab goes: nothing may still run in its namespaces

        def wrap(node: int) -> Callable[[list[str]], list[str]] | None:
            return None if lab is None else functools.partial(lab.command, node)

        cfg = options.cfg
        names = [f"aggregator-{a}" if a < shards else f"standby-{a - shards}" for a in range(hubs)]
        identity_paths = [work_dir / f"{name}.key" for name in names]
        if hubs > 1 and not cfg.aggregator_keys:
            keys = [public_key_to_hex(load_or_create_identity(path)[0].public_key) for path in identity_paths]
            cfg = cfg.with_overrides({"shards": shards, "aggregator_keys": keys})
        cfg = created(cfg)  # every node reads the run's architecture fingerprint from the one file
        config_path = work_dir / "run.toml"
        config_path.write_text(dump_run_config(cfg, "toml"))
        if options.serverless is not None:
            return _run_serverless(
                options, options.serverless, config_path, work_dir, children, events, on_event, started, threads
            )
        state_dir = options.state_dir or work_dir / "aggregator"
        aggregators: list[Child] = []
        readies: list[AggregatorReady] = []
        for a in range(hubs):
            hub = AggregatorFlags(
                config=config_path,
                state_dir=state_dir if hubs == 1 else state_dir / names[a],
                identity=identity_paths[a] if hubs > 1 else None,
                join=(readies[0].maddrs[0],) if readies else (),
                host="127.0.0.1" if lab is None else lab.addresses[a],
                threads=threads,
                http_port=options.http_port if lab is None and a == 0 else 0,  # nothing outside the lab reaches it
                as_json=True,
                # the honest peers: an adversary may never show up under its own key
                wait_for_peers=options.peers - options.adversaries if a < shards else 0,
                failover_after=SWARM_FAILOVER_S if a >= shards else AggregatorFlags().failover_after,
                task=_own_task(cfg),
            )
            name = "aggregator" if hubs == 1 else names[a]
            aggregator = start_child(name, hub.command(), work_dir=work_dir, threads=threads, wrap=wrap(a))
            children.append(aggregator)
            aggregators.append(aggregator)
            threading.Thread(target=pump, args=(aggregator, events), daemon=True).start()
            readies.append(_wait_ready(aggregator, events, on_event, AggregatorReady))
        join = readies[0].maddrs[0]
        for i in range(options.peers):
            child = _start_peer(
                options, i, join=join, work_dir=work_dir, state_dir=state_dir, threads=threads, wrap=wrap(hubs + i)
            )
            children.append(child)
            threading.Thread(target=pump, args=(child, events), daemon=True).start()
        killed: set[str] = set()

        def watch(name: str, event: Event) -> None:
            at = options.kill_aggregator_at
            if name == "standby-0" and isinstance(event, Followed) and event.round == at:
                signal_group(aggregators[0], signal.SIGKILL)  # a crash: no goodbye, no last announcement
                killed.add(aggregators[0].name)
                on_event("swarm", SwarmKilled(child=aggregators[0].name, after_round=at))
            on_event(name, event)

        _follow(children, events, watch, deadline=started + options.timeout_s, killed=killed)
        return _result(readies, aggregators, children[hubs:], wall_s=time.monotonic() - started, shards=shards)


def _start_peer(
    options: SwarmOptions,
    i: int,
    *,
    join: str,
    work_dir: Path,
    state_dir: Path,
    threads: int,
    wrap: Callable[[list[str]], list[str]] | None,
) -> Child:
    """Start peer `i`: an honest one from the swarm's peer flags, or the red team's (the last `adversaries`)."""
    identity = work_dir / f"peer-{i}.key"
    # in a sharded run no shard's aggregator has the model, so peer-0 scores it
    eval_batches = SHARDED_EVAL_BATCHES if options.aggregators > 1 and i == 0 else 0
    if i >= options.peers - options.adversaries:  # the red team's peer: its own program and flags
        args = ["peer", "--join", join, "--identity", str(identity), "--threads", str(threads), "--json"]
        if eval_batches:
            args += ["--eval-batches", str(eval_batches)]
        args += ["--spool", str(state_dir), *options.adversary_args]
        return start_child(
            f"adversary-{i}",
            args,
            work_dir=work_dir,
            threads=threads,
            module="potluck.lab.redteam",
            wrap=wrap,
            nice=PEER_NICE,
        )
    flags = options.peer.replace(
        join=(join,),
        task=_own_task(options.cfg),
        identity=identity,
        threads=threads,
        as_json=True,
        eval_batches=eval_batches,
        speed=options.peer_speeds[i] if i < len(options.peer_speeds) else options.peer.speed,
        receipts=work_dir / "receipts" / f"peer-{i}",
    )
    return start_child(f"peer-{i}", flags.command(), work_dir=work_dir, threads=threads, wrap=wrap, nice=PEER_NICE)


def _run_serverless(
    options: SwarmOptions,
    template: ServerlessFlags,
    config_path: Path,
    work_dir: Path,
    children: list[Child],
    events: "queue.Queue[tuple[Child, Event | None]]",
    on_event: Callable[[str, Event], None],
    started: float,
    threads: int,
) -> SwarmResult:
    """Peers only: peer-0 starts the run on 127.0.0.1, the others join it; its held-out losses are the run's."""

    def start(i: int, join: tuple[str, ...]) -> Child:
        flags = template.replace(
            join=join,
            config=config_path,
            task=_own_task(options.cfg),
            identity=work_dir / f"peer-{i}.key",
            host="127.0.0.1",
            threads=threads,
            as_json=True,
            speed=options.peer_speeds[i] if i < len(options.peer_speeds) else template.speed,
        )
        args = flags.command()
        child = start_child(f"peer-{i}", args, work_dir=work_dir, threads=threads, nice=PEER_NICE)
        children.append(child)
        threading.Thread(target=pump, args=(child, events), daemon=True).start()
        return child

    ready = _wait_ready(start(0, ()), events, on_event, ServerlessReady)
    for i in range(1, options.peers):
        start(i, (ready.maddrs[0],))
    _follow(children, events, on_event, deadline=started + options.timeout_s)
    rounds = [e for e in children[0].events if isinstance(e, ServerlessRound)]
    rows = []
    for child in children:
        per_round = [e for e in child.events if isinstance(e, ServerlessRound)]
        synced = next((e for e in child.events if isinstance(e, ServerlessSynced)), None)
        rows.append(
            {
                "name": child.name,
                "joined_round": None if synced is None else synced.round,
                "state_from": None if synced is None else synced.source,
                "tokens": sum(e.tokens for e in per_round),
                "inner_steps": sum(e.inner_steps for e in per_round),
                "groups": [e.group for e in per_round],  # peers in each round's all-reduce, itself included
                "rounds": [encode_event(e) for e in per_round],
            }
        )
    return SwarmResult(
        initial_val_loss=float(ready.val_loss),
        final_val_loss=float(rounds[-1].val_loss) if rounds else float(ready.val_loss),
        rounds_completed=len(rounds),
        aggregator_multiaddrs=[],
        num_params=ready.num_params,
        peers=rows,
        rounds=[encode_event(e) for e in rounds],
        wall_s=time.monotonic() - started,
    )


def _wait_ready(
    first: Child,
    events: "queue.Queue[tuple[Child, Event | None]]",
    on_event: Callable[[str, Event], None],
    kind: type[R],
) -> R:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            child, event = events.get(timeout=0.5)
        except queue.Empty:
            continue
        if event is None:
            raise SwarmError(f"the {first.name} exited before it was ready: {why(first, first.process.poll())}")
        child.events.append(event)
        on_event(child.name, event)
        if isinstance(event, kind):
            return event
    raise SwarmError(f"the {first.name} was not ready within {READY_TIMEOUT_S:.0f} s: {last_log_line(first)}")


def _follow(
    children: list[Child],
    events: "queue.Queue[tuple[Child, Event | None]]",
    on_event: Callable[[str, Event], None],
    *,
    deadline: float,
    killed: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Consume events until every child's stdout has closed; fail fast when one exits with an error.

    The children named in `killed` were killed on purpose: their exit status is not an error.
    """
    open_streams = {child.name for child in children}
    while open_streams:
        if time.monotonic() > deadline:
            raise SwarmError("the swarm ran past its --timeout; stopping every process")
        try:
            child, event = events.get(timeout=0.5)
        except queue.Empty:
            continue
        if event is not None:
            child.events.append(event)
            on_event(child.name, event)
            continue
        open_streams.discard(child.name)
        code = child.process.wait()
        if code != 0 and child.name not in killed:
            failed = SwarmDiverged if code == DIVERGED_EXIT_STATUS else SwarmError
            raise failed(f"{child.name} exited with status {code}: {why(child, code)}")


def _result(
    readies: list[AggregatorReady], aggregators: list[Child], peers: list[Child], *, wall_s: float, shards: int = 1
) -> SwarmResult:
    """The swarm's outcome: shard 0's rounds, each aggregator's ingest, each peer's work.

    Shard 0's rounds are its owner's, then its standby's once that took over. The held-out losses are
    theirs, or, in a sharded run, peer-0's (it scores its copy of the whole model).
    """
    ready = readies[0]
    first_shard = [child for child, r in zip(aggregators, readies, strict=True) if r.shard == 0]
    closes = [e for c in first_shard for e in c.events if isinstance(e, RoundClosed)]
    rounds: list[dict[str, Any]] = [encode_event(e) for e in closes]  # JSON rows: `--json` prints them as they are
    reported = {e.round for e in closes}
    for e in (e for c in first_shard for e in c.events if isinstance(e, Followed)):
        if e.round not in reported:  # its owner was killed between publishing the round and reporting it
            rounds.append(
                {**encode_event(e), "event": "round", "closed_by": "owner (killed)", "val_loss": None, "accepted": []}
            )
    rounds.sort(key=lambda e: e["round"])
    losses = [e["val_loss"] for e in rounds if e["val_loss"] is not None]
    initial, final = ready.val_loss, losses[-1] if losses else ready.val_loss
    if shards > 1:
        synced = next(e for e in peers[0].events if isinstance(e, PeerSynced))
        scored = [e.val_loss for e in peers[0].events if isinstance(e, PeerRound)]
        initial, final = synced.val_loss, scored[-1] if scored else synced.val_loss
    if initial is None or final is None:
        raise SwarmError("the run reported no held-out loss to compare (in a sharded run the peers score it)")
    hub_rows = []
    for child, hub_ready in zip(aggregators, readies, strict=True):
        closed = [e for e in child.events if isinstance(e, RoundClosed)]
        hub_rows.append(
            {
                "name": child.name,
                "shard": hub_ready.shard,
                "num_params": hub_ready.num_params,
                "rounds_closed": len(closed),
                "updates_accepted": sum(len(e.accepted) for e in closed),
                "bytes_in": closed[-1].bytes_in if closed else 0,  # uploads, mostly
                "bytes_out": closed[-1].bytes_out if closed else 0,
                "standby_of": hub_ready.standby_of,
                "took_over_at": next((e.round for e in child.events if isinstance(e, Takeover)), None),
            }
        )
    peer_rows = [_peer_row(child) for child in peers]
    return SwarmResult(
        initial_val_loss=float(initial),
        final_val_loss=float(final),
        rounds_completed=len(rounds),
        aggregator_multiaddrs=list(ready.maddrs),
        num_params=sum(r.num_params for r in readies if not r.standby_of),
        peers=peer_rows,
        rounds=rounds,
        wall_s=wall_s,
        aggregators=hub_rows,
    )


def _peer_row(child: Child) -> dict[str, Any]:
    """One peer's row of the swarm's `--json`: its summary (`done`), else what its rounds add up to."""
    done = next((e for e in reversed(child.events) if isinstance(e, PeerDone)), None)
    synced = next((e for e in child.events if isinstance(e, PeerSynced)), None)
    per_round = [e for e in child.events if isinstance(e, PeerRound)]
    adversarial = [e.update for e in child.events if isinstance(e, Adversarial)]
    return {
        "name": child.name,
        "fingerprint": done.fingerprint if done else synced.fingerprint if synced else None,
        "accepted": done.accepted if done else sum(e.accepted for e in per_round),
        "rejected": done.rejected if done else sum(not e.accepted for e in per_round),
        "bytes_up": done.bytes_up if done else 0,
        "bytes_down": done.bytes_down if done else 0,
        "joined_round": synced.round if synced else None,
        "state_sources": synced.state_sources if synced else {},  # bytes of the state each donor gave it
        "state_bytes_served": done.state_bytes_served if done else 0,  # chunks it gave joiners
        "tokens": done.tokens if done else sum(e.tokens for e in per_round),
        "inner_steps": done.inner_steps if done else sum(e.inner_steps for e in per_round),
        # of them, taken before their round's base arrived (overlap trains through the network's time)
        "stale_steps": sum(e.stale_steps for e in per_round),
        "compute_utilization": done.compute_utilization if done else None,
        "compute_s": done.compute_s if done else None,
        "active_s": done.active_s if done else None,
        "speed": done.speed if done else 1.0,
        "nice": done.nice if done else None,  # its CPU priority: PEER_NICE where the platform allows
        "adversary": child.name.startswith("adversary-"),
        # digests of every upload it made (an adversary may send several a round, under other keys)
        "uploads": adversarial or [e.update for e in per_round if e.update],
        "rounds": [encode_event(e) for e in per_round],
    }
