"""A chaos soak: a swarm trained through crashes, then checked for anything acknowledged and lost.

One aggregator, its standby and N peers run as real processes on 127.0.0.1 (potluck.lab.children) while a
seeded schedule does what real volunteers and operators do to a run:

- SIGKILLs peers (the whole process group, p2pd included) and restarts them a round or three later, with
  their identity and receipts;
- `kill -9`s the aggregator mid-round, once it has accepted an upload of the round, and restarts it at once
  on the same state dir, port and key;
- kills the aggregator for good (also mid-round), so that its standby takes the shard over;
- starts one peer whose state disk is full: each file it writes may hold only a few bytes (RLIMIT_FSIZE;
  Python ignores SIGXFSZ, so a write past it fails with EFBIG), so every receipt it tries to keep fails.

Then it checks: `potluck ledger verify` passes for every aggregator's ledger, every receipt the peers kept
verifies offline, every update acknowledged (on upload, or by a verified final receipt) is in a ledger,
each kept aggregate's `updates_root` is the Merkle root of its round's accepted ledger rows, no round
ran past its deadline (plus a grace), and the final held-out loss is within 5% of a calm run of the same
length, run first in the same invocation with the same seeds and peer keys.

    nice -n 10 python bench/chaos.py                      # 8 peers, 30 rounds, then the calm run's figures
    python bench/chaos.py --peers 3 --rounds 6 --json     # a short one

Every child is stopped however the soak ends (done, failed, timeout, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from bench.chaos_checks import (  # noqa: E402
    Ack,
    compare,
    result_of,
    summary,
)
from bench.chaos_plan import Action, Plan, schedule  # noqa: E402
from potluck.cli.aggregator import AggregatorFlags  # noqa: E402
from potluck.cli.peer_flags import PeerFlags  # noqa: E402
from potluck.events import (  # noqa: E402
    AggregatorReady,
    Event,
    PeerRound,
    ReceiptReceived,
    RoundClosed,
    Takeover,
    UpdateReceived,
)
from potluck.lab.children import (  # noqa: E402
    Child,
    pump,
    signal_group,
    sigterm_unwinds,
    start_child,
    stop_children,
    threads_per_process,
)
from potluck.protocol.config import RunConfig  # noqa: E402
from potluck.protocol.config_files import dump_run_config  # noqa: E402
from potluck.protocol.identity import Identity, public_key_to_hex, save_identity  # noqa: E402
from potluck.tasks import created  # noqa: E402

READY_TIMEOUT_S = 180.0
JOIN_TIMEOUT_S = 120.0  # a peer's first DHT ping, on a shared 2-core box with ten processes starting at once
PEER_NICE = 10


class ChaosError(RuntimeError):
    """The soak could not run to its end (a child failed to start, the acting aggregator crashed, timeout)."""


def _identity(seed: int, name: str, path: Path) -> bytes:
    """A key derived from the seed, so the calm and the chaos run have the same peers (and the same data)."""
    digest = hashlib.sha256(f"potluck-chaos/{seed}/{name}".encode()).digest()
    identity = Identity(private_key=Ed25519PrivateKey.from_private_bytes(digest))
    save_identity(identity, path, overwrite=True)
    return identity.public_key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_full_disk(name: str, args: list[str], *, work_dir: Path, threads: int, fsize: int) -> Child:
    """A peer whose every file may hold `fsize` bytes; its log is piped through us, or the limit would cut it too."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        os.nice(PEER_NICE)

    process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "potluck", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=limit,  # noqa: PLW1509 - only async-signal-safe calls
    )
    log_path = work_dir / f"{name}.log"

    def copy_log() -> None:
        assert process.stderr is not None
        with process.stderr, open(log_path, "w") as log:
            for line in process.stderr:
                log.write(line)
                log.flush()

    threading.Thread(target=copy_log, daemon=True).start()
    return Child(name=name, process=process, log_path=log_path)


@dataclass(kw_only=True)
class Soak:
    """One run of a plan: its children, what it did to them, and what they printed."""

    plan: Plan
    work_dir: Path
    say: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    children: list[Child] = field(default_factory=list)  # every incarnation, for the final stop
    alive: dict[str, Child] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)  # ids of the children killed on purpose
    open: set[int] = field(default_factory=set)  # ids of the children whose stdout has not closed yet
    events: queue.Queue[tuple[Child, Event | None]] = field(default_factory=queue.Queue)
    log: list[dict[str, Any]] = field(default_factory=list)  # (time, child, event) of what matters
    acks: list[Ack] = field(default_factory=list)
    closes: list[dict[str, Any]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    after_end: list[str] = field(default_factory=list)  # exits with an error once the run was over (a late rejoin)
    lingered: list[str] = field(default_factory=list)
    finished_at: float | None = None
    outages: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)

    def now(self) -> float:
        """Seconds since the soak started."""
        return time.monotonic() - self.started

    def start(self, name: str, flags: str | None = None) -> Child:
        """Start (or restart) the node `name` from its flags (those under `flags`); its events go to the queue."""
        threads = threads_per_process(self.plan.peers + 1)
        args = self.flags[flags or name]
        if name == f"peer-{self.plan.peers - 1}" and self.plan.full_disk:
            child = _start_full_disk(name, args, work_dir=self.work_dir, threads=threads, fsize=self.plan.fsize_bytes)
        else:
            nice = PEER_NICE if name.startswith("peer-") else 0
            incarnation = f"{name}.{sum(c.name == name for c in self.children)}"  # a log file each
            child = start_child(incarnation, args, work_dir=self.work_dir, threads=threads, nice=nice)
            child.name = name
        self.children.append(child)
        self.alive[name] = child
        self.open.add(id(child))
        threading.Thread(target=pump, args=(child, self.events), daemon=True).start()
        return child

    def kill(self, name: str) -> None:
        """SIGKILL `name`'s whole process group (it and its p2pd) and reap it."""
        child = self.alive.pop(name)
        self.killed.add(id(child))
        signal_group(child, signal.SIGKILL)
        child.process.wait(timeout=30)

    def count(self, what: str) -> None:
        """One more `what` (kills, restarts) for the summary."""
        self.counts[what] = self.counts.get(what, 0) + 1


def _setup(soak: Soak) -> None:
    """The run's config, keys and every node's flags: the aggregator, its standby and the peers."""
    plan, work = soak.plan, soak.work_dir
    names = ["aggregator", "standby"]
    for name in names:
        soak.keys[name] = _identity(plan.seed, name, work / f"{name}.key")
    cfg = RunConfig().with_overrides(
        {
            "rounds": plan.rounds,
            "seed": plan.seed,
            "local_steps": plan.local_steps,
            "inner.warmup_steps": 2,
            "inner.batch_size": 8,
            "data.max_bytes": 400_000,
            "round_deadline_s": plan.deadline_s,
            "aggregator_keys": [public_key_to_hex(soak.keys[n]) for n in names],
        },
        source="chaos",
    )
    config = work / "run.toml"
    config.write_text(dump_run_config(created(cfg), "toml"))
    port = _free_port()
    primary = AggregatorFlags(
        config=config,
        state_dir=work / "aggregator",
        identity=work / "aggregator.key",
        host="127.0.0.1",
        port=port,
        threads=threads_per_process(plan.peers + 1),
        http_port=0,
        as_json=True,
    )
    soak.flags["aggregator.first"] = primary.replace(wait_for_peers=plan.peers).command()
    soak.flags["aggregator"] = primary.command()  # a restart waits for nobody: its peers are mid-run
    soak.flags["standby"] = primary.replace(
        state_dir=work / "standby", identity=work / "standby.key", port=0, failover_after=plan.failover_after_s
    ).command()
    soak.flags["join"] = [f"/ip4/127.0.0.1/tcp/{port}"]  # completed with the peer id once ready


def _peer_flags(soak: Soak, i: int, joins: tuple[str, ...]) -> list[str]:
    name = f"peer-{i}"
    home = soak.work_dir / name  # the peer's state: its key and its receipts
    home.mkdir(exist_ok=True)
    soak.keys[name] = _identity(soak.plan.seed, name, home / "identity.key")
    flags = PeerFlags().replace(
        join=joins,
        identity=home / "identity.key",
        receipts=home / "receipts",
        threads=threads_per_process(soak.plan.peers + 1),
        as_json=True,
        join_timeout=JOIN_TIMEOUT_S,
    )
    return flags.command()


def _wait_ready(soak: Soak, name: str) -> AggregatorReady:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            child, event = soak.events.get(timeout=0.5)
            if event is None:
                raise ChaosError(f"{child.name} exited before it was ready (log: {child.log_path})")
            child.events.append(event)
            if child.name == name and isinstance(event, AggregatorReady):
                return event
    raise ChaosError(f"{name} was not ready within {READY_TIMEOUT_S:.0f} s")


def _act(soak: Soak, action: Action) -> None:
    """Do one scheduled thing, and say so."""
    r = action.round
    if action.kind == "kill-peer":
        if action.target in soak.alive:
            soak.kill(action.target)
            soak.count("peer_kills")
    elif action.kind == "restart-peer":
        if action.target not in soak.alive:
            soak.start(action.target)
            soak.count("peer_restarts")
    elif action.kind in ("kill-aggregator", "takeover") and "aggregator" in soak.alive:
        soak.kill("aggregator")
        soak.count("aggregator_kills")
        soak.outages.append({"kind": action.kind, "round": r, "from_s": soak.now(), "to_s": None, "spooled": None})
        if action.kind == "kill-aggregator":
            soak.start("aggregator")
            soak.count("aggregator_restarts")
    else:
        return
    soak.say(f"[{soak.now():7.1f}s] chaos: {action.kind} {action.target} (round {r})")
    soak.log.append({"t": round(soak.now(), 2), "action": action.kind, "target": action.target, "round": r})


def _on_event(soak: Soak, child: Child, event: Event, due: list[tuple[float, Action]], actions: list[Action]) -> None:
    """Record what the checks need; at each round close, queue the next round's actions."""
    if isinstance(event, RoundClosed):
        row = {
            "round": event.round,
            "by": child.name,
            "closed_by": event.closed_by,
            "round_s": round(event.round_s, 2),
            "accepted": len(event.accepted),
            "val_loss": event.val_loss,
            "t": round(soak.now(), 2),
        }
        soak.closes.append(row)
        loss = "-" if event.val_loss is None else f"{event.val_loss:.4f}"
        soak.say(
            f"[{soak.now():7.1f}s] round {event.round:>3} closed by {child.name} ({event.closed_by}) in "
            f"{event.round_s:5.1f} s, {len(event.accepted)} accepted, val_loss {loss}"
        )
        if event.round == soak.plan.rounds - 1 and soak.finished_at is None:
            soak.finished_at = time.monotonic()
        for action in (a for a in actions if a.round == event.round + 1 and a.target != "aggregator"):
            due.append((time.monotonic() + action.delay_s, action))
    elif isinstance(event, UpdateReceived) and event.accepted and child is soak.alive.get("aggregator"):
        # the aggregator dies with an accepted upload of the open round spooled: what a crash must not lose
        for action in [a for a in actions if a.round == event.round and a.target == "aggregator"]:
            actions.remove(action)  # once: the restarted aggregator accepts this round's uploads again
            due.append((time.monotonic() + action.delay_s, action))
    elif isinstance(event, AggregatorReady | Takeover) and soak.outages and soak.outages[-1]["to_s"] is None:
        if isinstance(event, Takeover) or not event.standby_of:
            outage = soak.outages[-1]
            outage["to_s"] = round(soak.now(), 2)
            outage["by"] = child.name
            outage["spooled"] = event.spooled_updates if isinstance(event, AggregatorReady) else None
            down_s = outage["to_s"] - outage["from_s"]
            soak.say(
                f"[{soak.now():7.1f}s] {child.name} serves again (round {event.round}), {down_s:.1f} s after the kill"
            )
    elif isinstance(event, PeerRound) and event.accepted and event.update:
        soak.acks.append(Ack(peer=child.name, round=event.round, update=event.update, kind="upload"))
    elif isinstance(event, ReceiptReceived) and event.accepted:
        soak.acks.append(Ack(peer=child.name, round=event.round, update=event.update, kind="final"))


def _follow(soak: Soak, actions: list[Action]) -> None:
    """Consume events and run the schedule until every child's stdout has closed."""
    deadline = soak.started + soak.plan.timeout_s
    pending = list(actions)
    due: list[tuple[float, Action]] = []
    for action in (a for a in actions if a.round == 0):
        due.append((time.monotonic() + action.delay_s, action))
    while True:
        for when, action in sorted(due, key=lambda d: d[0]):
            if when <= time.monotonic():
                due.remove((when, action))
                _act(soak, action)
        if not soak.open:
            return
        if soak.finished_at is not None and time.monotonic() > soak.finished_at + soak.plan.end_grace_s:
            soak.lingered = sorted(name for name, c in soak.alive.items() if id(c) in soak.open)
            soak.say(f"[{soak.now():7.1f}s] the run is over; still running, stopped: {', '.join(soak.lingered)}")
            return
        if time.monotonic() > deadline:
            raise ChaosError(f"the soak ran past {soak.plan.timeout_s:.0f} s")
        try:
            child, event = soak.events.get(timeout=0.2)
        except queue.Empty:
            continue
        if event is not None:
            child.events.append(event)
            _on_event(soak, child, event, due, pending)
            continue
        soak.open.discard(id(child))
        code = child.process.wait()
        if id(child) in soak.killed:
            continue
        if soak.alive.get(child.name) is child:
            del soak.alive[child.name]
        if code != 0 and soak.finished_at is not None:
            soak.after_end.append(f"{child.name} exited {code} after the run ended")
        elif code != 0:
            last = (
                child.log_path.read_text(errors="replace").strip().splitlines()[-1:] if child.log_path.exists() else []
            )
            soak.crashes.append(f"{child.name} exited {code}: {last[0] if last else '(empty log)'}")
            soak.say(f"[{soak.now():7.1f}s] {soak.crashes[-1]}")


def run(
    plan: Plan, *, work_dir: Path, say: Callable[[str], None], actions: list[Action] | None = None
) -> dict[str, Any]:
    """Run `plan` to its end, stop every child, check what it left; the result (see `_result`).

    `actions`: what to do instead of the seeded schedule (a test's fixed few). A standby runs only
    when the plan has a take-over.
    """
    soak = Soak(plan=plan, work_dir=work_dir, say=say)
    actions = schedule(plan) if actions is None else actions
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_unwinds())
        stack.callback(stop_children, soak.children)
        _setup(soak)
        soak.start("aggregator", "aggregator.first")
        ready = _wait_ready(soak, "aggregator")
        joins = tuple(ready.maddrs[:1])
        if plan.takeover:
            soak.start("standby")
            standby = _wait_ready(soak, "standby")
            joins += tuple(standby.maddrs[:1])  # where peers (re)join once the aggregator is gone for good
        for i in range(plan.peers):
            soak.flags[f"peer-{i}"] = _peer_flags(soak, i, joins)
            soak.start(f"peer-{i}")
        hubs = "aggregator, standby" if plan.takeover else "aggregator"
        say(f"[{soak.now():7.1f}s] {hubs} and {plan.peers} peers started; {len(actions)} actions planned")
        _follow(soak, actions)
    return result_of(soak, ready, actions)


def soak(plan: Plan, *, say: Callable[[str], None], keep: Path | None = None) -> dict[str, Any]:
    """The calm run, then the chaos run (same seeds, same keys), and the comparison."""
    results = {}
    for label, p in (("calm", plan.calm()), ("chaos", plan)):
        with _work_dir(keep, label) as work:
            say(f"--- {label} run: {p.peers} peers, {p.rounds} rounds, seed {p.seed} (work dir {work})")
            results[label] = run(p, work_dir=work, say=say)
    verdict = compare(results["calm"], results["chaos"])
    return {**results, **verdict}


@contextlib.contextmanager
def _work_dir(keep: Path | None, label: str) -> Iterator[Path]:
    if keep is not None:
        path = keep / label
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=f"potluck-chaos-{label}-") as tmp:
        yield Path(tmp)


def main() -> None:
    """`python bench/chaos.py`: the soak, its status lines on stderr, the summary (or `--json`) on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Plan()
    parser.add_argument("--peers", type=int, default=default.peers)
    parser.add_argument("--rounds", type=int, default=default.rounds)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--peer-kills", type=int, default=default.peer_kills)
    parser.add_argument("--aggregator-restarts", type=int, default=default.aggregator_restarts)
    parser.add_argument("--no-takeover", action="store_true", help="no standby take-over")
    parser.add_argument("--no-full-disk", action="store_true", help="no peer with a full disk")
    parser.add_argument("--deadline", type=float, default=default.deadline_s, help="round_deadline_s")
    parser.add_argument("--local-steps", type=int, default=default.local_steps)
    parser.add_argument("--timeout", type=float, default=default.timeout_s, help="per run, seconds")
    parser.add_argument("--keep", type=Path, help="keep the work dirs (logs, ledgers, receipts) here")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    plan = Plan(
        peers=args.peers,
        rounds=args.rounds,
        seed=args.seed,
        peer_kills=args.peer_kills,
        aggregator_restarts=args.aggregator_restarts,
        takeover=not args.no_takeover,
        full_disk=not args.no_full_disk,
        deadline_s=args.deadline,
        local_steps=args.local_steps,
        timeout_s=args.timeout,
    )
    result = soak(plan, say=lambda line: print(line, file=sys.stderr, flush=True), keep=args.keep)
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(summary(result["calm"], result["chaos"], result)))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
