"""potluck against hivemind.Optimizer and DDP (gloo): the same model, data and peers, side by side, over seeds.

    python bench/compare_systems.py --peers 4 --rounds 8 --link 10mbit/100mbit --seeds 0,1,2 \\
        --set model.size=small --set local_steps=100 --out bench/results/compare-systems-v2
    python bench/compare_systems.py --link none --systems potluck,ddp --seeds 0   # on 127.0.0.1, a subset

Systems, one after another so they share the machine's state; seeds run interleaved (every system for seed 0,
then for seed 1, ...), the order of the systems rotated by one per seed so that none always runs first:

- `potluck`, `potluck-overlap`, `potluck-average`: a real local swarm, `potluck swarm --json` (aggregator and
  peers as processes): its defaults; with `--overlap`; and with plain averaging as the outer step
  (`outer.kind=average`), the control for the outer optimizer.
- `hivemind`, `hivemind-blocking`: `hivemind.Optimizer` with local AdamW updates and parameter averaging about
  every `local_steps` steps, one process per peer, in its default background averaging and blocking
  (bench/compare_workers.py says how it is configured and why).
- `ddp`, `ddp-bf16`, `ddp-powersgd`: `DistributedDataParallel` over gloo, an all-reduce and an AdamW step per
  batch, one process per peer: fp32, and with torch's bf16 and PowerSGD communication hooks.

All train what `potluck swarm` trains: `RunConfig()` with `--rounds` and every `--set` (the model size, local
steps, batch), the seed of the invocation's turn (`seed=N`), for `rounds x local_steps` inner steps per peer,
and all report potluck's held-out loss (the aggregator's 8 fixed held-out batches, `evaluate`) once per round's
worth of steps; the baselines' step-0 loss must equal potluck's initial loss, and a warning says so when it does
not. Pick `--set` so that a round of compute takes at least ~10 s on the machine: start-up and fixed per-round
costs should not decide the comparison.

In the lab (`--link UP/DOWN`) every system gets the same topology: node 0 behind 1gbit/1gbit (potluck's
aggregator; unused by the baselines) and one node per peer behind the link, so every peer of every system
sits behind the same shaped link. Bytes up and down per peer are read from the lab's own counters (the hub's
end of each node's veth, sampled twice a second) for every system alike: all traffic, headers, DHT and
retries included. On localhost (`--link none`) only potluck's own byte counts exist; the baselines' are null.

Times are seconds since the system was launched (its lab, imports and start-up included). Compute utilization
is, as in potluck's peers, time in inner steps (communication and evaluation excluded) over the wall time from
a peer's first step to its last. Targets, per seed: the fp32 DDP's held-out loss at 50%, 75% and 100% of its
steps (interpolated between its evaluations), or `--target`; a system's time to a target is interpolated
between the evaluations on either side of its first crossing, and null where it never got there. Over the
seeds: means with 95% t-intervals, and each system's time to target as a ratio to `--reference`'s, paired per
seed. hivemind's bytes are set beside the volume its fp16 butterfly all-reduce should move.

Outputs with `--out PREFIX`: PREFIX.jsonl (one compact line per run: evaluations, peers, bytes), PREFIX.md (the
tables) and, for the first seed, PREFIX-loss-vs-wall.png and PREFIX-loss-vs-bytes.png (matplotlib:
`pip install -e .[bench]`).
"""

import argparse
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potluck.lab.intervals import mean_interval
from potluck.lab.netlab import NetLab, parse_link
from potluck.protocol.config import RunConfig
from potluck.protocol.config_files import parse_overrides
from potluck.training.models import build_model, model_config

POTLUCK_SYSTEMS = {  # name: (swarm flags, extra --set)
    "potluck": (("--no-overlap",), ()),
    "potluck-overlap": (("--overlap",), ()),
    "potluck-average": (("--no-overlap",), ("outer.kind=average",)),
}
SYSTEMS = (*POTLUCK_SYSTEMS, "hivemind", "hivemind-blocking", "ddp", "ddp-bf16", "ddp-powersgd")
TARGET_FRACTIONS = (0.5, 0.75, 1.0)  # of the fp32 DDP's steps: its held-out loss there is a target
WORKERS = Path(__file__).with_name("compare_workers.py")
AGGREGATOR_LINK = "1gbit/1gbit"  # node 0, as `potluck swarm --link` places its aggregator
SAMPLE_PERIOD_S = 0.5  # how often the lab's byte counters are read
STOP_GRACE_S = 30.0  # after SIGTERM, how long a child may take to stop (a swarm stops its own children first)
STRAGGLER_GRACE_S = 60.0  # hivemind: how long peers may go on once one has finished the run (2x averaging_timeout)
DDP_PORT = 29500  # rank 0's TCP store; in the lab every node is a fresh namespace, so the port is free


class BenchError(Exception):
    """One system could not run to its end (one line, with the failing process's last log line)."""


# ---------------------------------------------------------------------------------------------- processes


@dataclass(kw_only=True, slots=True)
class Proc:
    """A child process in a session (process group) of its own, its log file and the JSON lines it printed."""

    name: str
    popen: subprocess.Popen[str]
    log_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)

    def last_log_line(self) -> str:
        """The last non-empty line of its log, for error messages."""
        with contextlib.suppress(OSError):
            lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
            return lines[-1] if lines else "(empty log)"
        return "(no log)"

    def event(self, kind: str) -> dict[str, Any] | None:
        """The last event of this kind it printed, or None."""
        return next((e for e in reversed(self.events) if e.get("event") == kind), None)


_LIVE: list[Proc] = []  # every child not yet stopped: main() stops them on any way out


def start(name: str, argv: list[str], *, log_dir: Path, env: dict[str, str], stdin: bool = False) -> Proc:
    """`argv` in a new session, stdout read as JSON lines by a thread, stderr into LOG_DIR/NAME.log."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        popen = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            start_new_session=True,  # it, its p2pd and its helpers form one group, killed together
        )
    proc = Proc(name=name, popen=popen, log_path=log_path)
    _LIVE.append(proc)
    threading.Thread(target=_pump, args=(proc,), daemon=True).start()
    return proc


def _pump(proc: Proc) -> None:
    stream = proc.popen.stdout
    assert stream is not None
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict):
                    proc.events.append(event)
    proc.closed.set()


def _descendants(roots: list[int]) -> list[int]:
    """Every live process below `roots` (read from /proc), so that children in sessions of their own are found."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(procs: list[Proc], *, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each child's group, wait up to `grace_s`, then SIGKILL the groups and every process below them."""
    roots = [p.popen.pid for p in procs]
    below = _descendants(roots)
    for proc in procs:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
    for _ in range(2):  # a second pass catches what was started while the first ran
        below = sorted(set(below) | set(_descendants(roots + below)))
        for pid in roots + below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # the groups our children (and a swarm's children) lead
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)
        if proc.popen.stdin is not None:
            with contextlib.suppress(OSError):
                proc.popen.stdin.close()
        if proc in _LIVE:
            _LIVE.remove(proc)


def wait_exit(procs: list[Proc], *, deadline: float, straggler_grace_s: float | None = None) -> list[str]:
    """Until every child has exited and its output is read; BenchError on a failure or past `deadline`.

    With `straggler_grace_s`, once one child has printed `done` the others get that long to finish; those still
    running then are stopped, and their names returned (a hivemind peer left an epoch behind by its background
    averaging can wait for a group that never forms).
    """
    grace_ends: float | None = None
    while True:
        for proc in procs:
            code = proc.popen.poll()
            if code not in (None, 0):
                raise BenchError(f"{proc.name} exited with status {code}: {proc.last_log_line()}")
        if all(p.popen.poll() == 0 and p.closed.is_set() for p in procs):
            return []
        if straggler_grace_s is not None and grace_ends is None and any(p.event("done") for p in procs):
            grace_ends = time.monotonic() + straggler_grace_s
        if grace_ends is not None and time.monotonic() > grace_ends:
            left = [p for p in procs if p.popen.poll() is None]
            stop(left)
            return [p.name for p in left]
        if time.monotonic() > deadline:
            slow = [p.name for p in procs if p.popen.poll() is None]
            raise BenchError(f"{', '.join(slow)} still running at the time limit (--timeout-s); stopped")
        time.sleep(0.2)


def wait_event(procs: list[Proc], kind: str, *, deadline: float) -> None:
    """Until every child printed an event of `kind`; BenchError when one exits first or past `deadline`."""
    while not all(p.event(kind) for p in procs):
        for proc in procs:
            if proc.popen.poll() is not None and not proc.event(kind):
                raise BenchError(f"{proc.name} exited before '{kind}': {proc.last_log_line()}")
        if time.monotonic() > deadline:
            raise BenchError(f"no '{kind}' from every process within the time limit (--timeout-s)")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- byte counters


class LinkCounters:
    """Bytes each lab node sent and received, sampled from the hub's end of its veth in a thread.

    The hub's `v<i>` receives what node i uploads and transmits what it downloads, after the tc shaping, so
    one `ip` call reads every node's traffic. `hub()` names the hub namespace, or None while it does not exist.
    """

    def __init__(self, hub: Callable[[], str | None], *, nodes: int) -> None:
        self.hub = hub
        self.nodes = nodes
        self.samples: list[tuple[float, list[int], list[int]]] = []  # (epoch s, up per node, down per node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LinkCounters":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()  # the last word, while the lab still stands

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            self.sample()

    def sample(self) -> None:
        """Read every node's counters now (nothing when the hub is gone or not yet there)."""
        name = self.hub()
        if name is None:
            return
        done = subprocess.run(  # noqa: S603
            ["ip", "-n", name, "-s", "-j", "link", "show"], capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode != 0:
            return
        stats = {d["ifname"]: d.get("stats64", d.get("stats", {})) for d in json.loads(done.stdout or "[]")}
        if not all(f"v{i}" in stats for i in range(self.nodes)):
            return
        up = [int(stats[f"v{i}"]["rx"]["bytes"]) for i in range(self.nodes)]
        down = [int(stats[f"v{i}"]["tx"]["bytes"]) for i in range(self.nodes)]
        self.samples.append((time.time(), up, down))

    def at(self, time_s: float) -> tuple[list[int], list[int]] | None:
        """Each node's (up, down) at the last sample taken at or before `time_s` (the first one if none was)."""
        if not self.samples:
            return None
        before = [s for s in self.samples if s[0] <= time_s] or self.samples[:1]
        return before[-1][1], before[-1][2]

    def final(self) -> tuple[list[int], list[int]] | None:
        """Each node's (up, down) at the last sample."""
        return (self.samples[-1][1], self.samples[-1][2]) if self.samples else None


def swarm_hub(owner_pid: int) -> Callable[[], str | None]:
    """The hub namespace of the lab that `potluck swarm` process `owner_pid` builds, once it exists."""
    found: list[str] = []

    def hub() -> str | None:
        if not found:
            out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False)
            names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
            found.extend(n for n in names if n.startswith(f"pl{owner_pid}x") and n.endswith("-hub"))
        return found[0] if found else None

    return hub


# ---------------------------------------------------------------------------------------------- the systems


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    """What every system is asked for."""

    peers: int
    rounds: int
    link: str | None  # UP/DOWN per peer in the lab; None: 127.0.0.1
    timeout_s: float
    log_dir: Path
    sets: tuple[str, ...] = ()  # `--set KEY=VALUE` for every system (the seed, the model size, local steps)
    potluck_set: tuple[str, ...] = ()  # extra `--set KEY=VALUE` for potluck's swarms (e.g. a codec's density)


def peer_bytes(counters: LinkCounters | None, peers: int, time_s: float | None = None) -> list[tuple[int, int]] | None:
    """(up, down) per peer (lab nodes 1..peers) at `time_s`, or at the end; None outside the lab."""
    if counters is None:
        return None
    reading = counters.final() if time_s is None else counters.at(time_s)
    if reading is None:
        return None
    up, down = reading
    return [(up[i + 1], down[i + 1]) for i in range(peers)]


def _mean_bytes(per_peer: list[tuple[int, int]] | None) -> tuple[float | None, float | None]:
    if not per_peer:
        return None, None
    return sum(u for u, _ in per_peer) / len(per_peer), sum(d for _, d in per_peer) / len(per_peer)


def run_potluck(setup: Setup, *, system: str) -> dict[str, Any]:
    """One `potluck swarm --json`; its rounds as eval points, its peers with the lab's byte counts."""
    flags, extra = POTLUCK_SYSTEMS[system]
    name = system
    argv = [sys.executable, "-m", "potluck", "swarm", "--http-port", "0", "--peers", str(setup.peers)]
    argv += ["--rounds", str(setup.rounds), *flags]
    for override in (*setup.sets, *extra, *setup.potluck_set):
        argv += ["--set", override]
    argv += ["--timeout", str(setup.timeout_s), "--json"]
    if setup.link is not None:
        argv += ["--link", setup.link]
    launched = time.time()
    proc = start(name, argv, log_dir=setup.log_dir, env={})
    counters = LinkCounters(swarm_hub(proc.popen.pid), nodes=setup.peers + 1) if setup.link else None
    try:
        with counters if counters is not None else contextlib.nullcontext():
            wait_exit([proc], deadline=time.monotonic() + setup.timeout_s + STOP_GRACE_S)
    finally:
        stop([proc])
    wall_s = time.time() - launched
    swarm = proc.events[-1] if proc.events else None
    if swarm is None or "rounds" not in swarm:
        raise BenchError(f"{name} printed no result: {proc.last_log_line()}")
    evals = []
    for r in swarm["rounds"]:
        up, down = _mean_bytes(peer_bytes(counters, setup.peers, r["time_s"]))
        evals.append(
            {"t": r["time_s"] - launched, "val_loss": r["val_loss"], "round": r["round"], "up": up, "down": down}
        )
    lab_bytes = peer_bytes(counters, setup.peers)
    peers = []
    for i, p in enumerate(swarm["peers"]):
        up, down = lab_bytes[i] if lab_bytes else (p["bytes_up"], p["bytes_down"])
        peers.append(
            {
                "name": p["name"],
                "tokens": p["tokens"],
                "inner_steps": p["inner_steps"],
                "compute_s": p["compute_s"],
                "utilization": p["compute_utilization"],
                "bytes_up": up,
                "bytes_down": down,
                "app_bytes_up": p["bytes_up"],  # potluck's own count of what it sent, framing only
                "app_bytes_down": p["bytes_down"],
            }
        )
    return {
        "system": name,
        "command": " ".join(["potluck", *argv[3:]]),
        "wall_s": wall_s,
        "initial_val_loss": swarm["initial_val_loss"],
        "evals": evals,
        "peers": peers,
        "bytes_source": "lab counters" if lab_bytes else "potluck's own counts",
        "aggregator_bytes": None if counters is None or counters.final() is None else _node0(counters),
        "counters": None if counters is None else counters.samples,
        "raw": swarm,
    }


def _node0(counters: LinkCounters) -> dict[str, int]:
    final = counters.final()
    assert final is not None
    return {"up": final[0][0], "down": final[1][0]}


def run_baseline(setup: Setup, *, system: str) -> dict[str, Any]:
    """The hivemind or DDP workers, peer i on lab node i + 1 (node 0 unused), all started together."""
    launched = time.time()
    deadline = time.monotonic() + setup.timeout_s
    threads = max(1, (os.cpu_count() or 1) // setup.peers)  # no aggregator: the peers share every core
    procs: list[Proc] = []
    with contextlib.ExitStack() as stack:
        lab = None
        if setup.link is not None:
            lab = stack.enter_context(NetLab([parse_link(AGGREGATOR_LINK)] + [parse_link(setup.link)] * setup.peers))
        counters = None if lab is None else stack.enter_context(LinkCounters(lambda: lab.hub, nodes=setup.peers + 1))
        stack.callback(stop, procs)  # runs before the counters' last sample and the lab's removal

        def host(rank: int) -> str:
            return "127.0.0.1" if lab is None else lab.addresses[rank + 1]

        def wrap(rank: int, argv: list[str]) -> list[str]:
            return argv if lab is None else lab.command(rank + 1, argv)

        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env["GLOO_SOCKET_IFNAME"] = "lo" if lab is None else "eth0"
        port = DDP_PORT if lab is not None else _free_port()
        base = [sys.executable, str(WORKERS), system, "--peers", str(setup.peers), "--rounds", str(setup.rounds)]
        base += ["--threads", str(threads), "--timeout-s", str(int(setup.timeout_s))]
        for override in setup.sets:
            base += ["--set", override]
        for rank in range(setup.peers):
            argv = [*base, "--rank", str(rank)]
            if system.startswith("ddp"):
                argv += ["--master-addr", host(0), "--master-port", str(port)]
            else:
                argv += ["--host", host(rank)]
                if rank > 0:
                    argv += ["--initial-peer", _maddr(procs[0], host(0))]
            procs.append(start(f"{system}-{rank}", wrap(rank, argv), log_dir=setup.log_dir, env=env, stdin=True))
            if system.startswith("hivemind") and rank == 0:
                wait_event(procs, "ready", deadline=deadline)  # the others join through its multiaddr
        if system.startswith("hivemind"):
            wait_event(procs, "ready", deadline=deadline)
            for proc in procs:  # go: every peer starts training together
                assert proc.popen.stdin is not None
                proc.popen.stdin.write("go\n")
                proc.popen.stdin.flush()
        grace = STRAGGLER_GRACE_S if system.startswith("hivemind") else None
        stragglers = wait_exit(procs, deadline=deadline, straggler_grace_s=grace)
        stack.close()  # stop (nothing left), the counters' last sample, the lab
        wall_s = time.time() - launched
    first = procs[0]
    evals = []
    for e in (e for e in first.events if e.get("event") == "eval"):
        up, down = _mean_bytes(peer_bytes(counters, setup.peers, e["time_s"]))
        evals.append(
            {"t": e["time_s"] - launched, "val_loss": e["val_loss"], "step": e["step"], "up": up, "down": down}
        )
    lab_bytes = peer_bytes(counters, setup.peers)
    peers = []
    for rank, proc in enumerate(procs):
        done = proc.event("done") or {}
        busy_s = done.get("active_s", 0.0) - done.get("eval_s", 0.0)  # the first peer's evaluations are not its job
        up, down = lab_bytes[rank] if lab_bytes else (None, None)
        peers.append(
            {
                "name": proc.name,
                "tokens": done.get("tokens"),
                "inner_steps": done.get("steps"),
                "compute_s": done.get("compute_s"),
                "comm_s": done.get("comm_s"),
                "utilization": min(1.0, done["compute_s"] / busy_s) if busy_s > 0 else None,
                "bytes_up": up,
                "bytes_down": down,
                "epochs": done.get("epochs"),
            }
        )
    return {
        "system": system,
        "command": " ".join(["python", "bench/compare_workers.py", *base[2:]]),
        "wall_s": wall_s,
        "initial_val_loss": next((e["val_loss"] for e in evals if e.get("step") == 0), None),
        "evals": [e for e in evals if e.get("step") != 0],  # potluck's rounds do not include the start either
        "peers": peers,
        "stopped_after_the_others": stragglers,
        "bytes_source": "lab counters" if lab_bytes else None,
        "counters": None if counters is None else counters.samples,
        "raw": {p.name: p.events for p in procs},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _maddr(proc: Proc, host: str) -> str:
    ready = proc.event("ready")
    assert ready is not None
    maddrs = [m for m in ready["maddrs"] if f"/ip4/{host}/" in m] or ready["maddrs"]
    return str(maddrs[0])


# ---------------------------------------------------------------------------------------------- report


def loss_at_step(initial: float, evals: list[dict[str, Any]], step: float) -> float | None:
    """The held-out loss at `step`, linear between the evaluations on either side (None past the last)."""
    points = [(0.0, initial)] + [(float(e["step"]), float(e["val_loss"])) for e in evals]
    for (s0, v0), (s1, v1) in itertools.pairwise(points):
        if s0 <= step <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def time_to(evals: list[dict[str, Any]], target: float) -> float | None:
    """Seconds to the first crossing of `target`, linear between the evaluations on either side (None: never)."""
    before: dict[str, Any] | None = None
    for e in evals:
        if e["val_loss"] <= target:
            if before is None or before["val_loss"] <= e["val_loss"]:
                return float(e["t"])
            share = (before["val_loss"] - target) / (before["val_loss"] - e["val_loss"])
            return float(before["t"] + share * (e["t"] - before["t"]))
        before = e
    return None


def seed_targets(results: list[dict[str, Any]], *, total_steps: int, target: float | None) -> list[float]:
    """One seed's targets: `target` if given, else the fp32 DDP's loss at TARGET_FRACTIONS of its steps, else
    (no DDP run) the worst final loss."""
    if target is not None:
        return [target]
    ddp = next((r for r in results if r["system"] == "ddp" and r.get("evals")), None)
    if ddp is not None and ddp.get("initial_val_loss") is not None:
        found = [loss_at_step(ddp["initial_val_loss"], ddp["evals"], f * total_steps) for f in TARGET_FRACTIONS]
        if all(v is not None for v in found):
            return [float(v) for v in found if v is not None]
    finals = [r["evals"][-1]["val_loss"] for r in results if r.get("evals")]
    return [max(finals)] if finals else []


def summarize(results: list[dict[str, Any]], *, targets: list[float]) -> None:
    """Fill in each of one seed's results: its final loss, time to each target and its per-peer means."""
    for r in results:
        if not r.get("evals"):
            continue
        r["targets"] = targets
        r["final_val_loss"] = r["evals"][-1]["val_loss"]
        r["s_to_final_eval"] = r["evals"][-1]["t"]
        r["s_to_targets"] = [time_to(r["evals"], t) for t in targets]
        ups = [p["bytes_up"] for p in r["peers"] if p["bytes_up"] is not None]
        downs = [p["bytes_down"] for p in r["peers"] if p["bytes_down"] is not None]
        r["mean_bytes_up"] = sum(ups) / len(ups) if ups else None
        r["mean_bytes_down"] = sum(downs) / len(downs) if downs else None
        utils = [p["utilization"] for p in r["peers"] if p["utilization"] is not None]
        r["mean_utilization"] = sum(utils) / len(utils) if utils else None


def over_seeds(results: list[dict[str, Any]], *, reference: str) -> str:
    """Markdown: per system, over the seeds, the final loss, time to each target and its ratio to `reference`'s
    (paired per seed, both having reached it), bytes and utilization, each mean with its 95% t-interval."""
    by_system: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by_system.setdefault(r["system"], {})[r["seed"]] = r
    n_targets = max((len(r.get("targets", [])) for r in results), default=0)
    names = [f"{int(f * 100)}%" for f in TARGET_FRACTIONS] if n_targets == len(TARGET_FRACTIONS) else ["target"]
    head = ["system", "runs", "final held-out loss"]
    head += [f"s to DDP's {n}" for n in names[:n_targets]] + [f"x {reference} at {n}" for n in names[:n_targets]]
    head += ["up per peer", "down per peer", "utilization"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    ref = by_system.get(reference, {})
    for system, runs in by_system.items():
        ok = {seed: r for seed, r in runs.items() if r.get("evals")}
        cells = [system, f"{len(ok)}/{len(runs)}", mean_interval([r["final_val_loss"] for r in ok.values()], ".4f")]
        for i in range(n_targets):
            times = [r["s_to_targets"][i] for r in ok.values() if r["s_to_targets"][i] is not None]
            reached = "" if len(times) == len(ok) else f" ({len(times)}/{len(ok)} reached)"
            cells.append(mean_interval(times, ".1f") + reached)
        for i in range(n_targets):
            ratios = [
                r["s_to_targets"][i] / ref[seed]["s_to_targets"][i]
                for seed, r in ok.items()
                if r["s_to_targets"][i] is not None
                and seed in ref
                and ref[seed].get("s_to_targets")
                and ref[seed]["s_to_targets"][i]
            ]
            cells.append(mean_interval(ratios, ".2f"))
        for key, spec in (("mean_bytes_up", "size"), ("mean_bytes_down", "size"), ("mean_utilization", ".3f")):
            values = [r[key] for r in ok.values() if r.get(key) is not None]
            if spec == "size":
                cells.append(_size(statistics.fmean(values)) if values else "-")
            else:
                cells.append(mean_interval(values, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hivemind_volume(results: list[dict[str, Any]], *, params: int, peers: int) -> str:
    """hivemind's measured bytes per peer beside what an fp16 butterfly all-reduce of the parameters moves per
    averaging round (each way: 2 (n-1)/n x params x 2 bytes, DHT and state downloads not included)."""
    per_round = 2 * (peers - 1) / peers * params * 2
    lines = []
    for r in results:
        if not r["system"].startswith("hivemind") or not r.get("evals") or r.get("mean_bytes_up") is None:
            continue
        epochs = max((p.get("epochs") or 0) for p in r["peers"])
        expected = per_round * epochs
        lines.append(
            f"- {r['system']} seed {r['seed']}: {epochs} averaging rounds, up {_size(r['mean_bytes_up'])} per peer "
            f"against {_size(expected)} for the all-reduces alone ({r['mean_bytes_up'] / expected:.2f}x)"
        )
    return "\n".join(lines)


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def tables(results: list[dict[str, Any]], *, seed: int) -> str:
    """Markdown for one seed: one summary row per system, then each system's peers."""
    targets: list[float] = next((r["targets"] for r in results if r.get("targets")), [])
    lines = [
        f"**seed {seed}**, targets: {', '.join(f'{t:.4f}' for t in targets) or '-'}.",
        "",
        "| system | wall s | s to final eval | final held-out loss | s to targets | up per peer | down per peer "
        "| utilization | tokens per peer |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error']} |||||||||")
            continue
        utils = [p["utilization"] for p in r["peers"] if p["utilization"] is not None]
        tokens = [p["tokens"] for p in r["peers"] if p["tokens"] is not None]
        stragglers = r.get("stopped_after_the_others")
        cells = [
            r["system"] + (f" ({', '.join(stragglers)} stopped after the others finished)" if stragglers else ""),
            f"{r['wall_s']:.1f}",
            _num(r.get("s_to_final_eval"), ".1f"),
            _num(r.get("final_val_loss"), ".4f"),
            " / ".join(_num(t, ".1f") for t in r.get("s_to_targets", [])) or "-",
            _size(r.get("mean_bytes_up")),
            _size(r.get("mean_bytes_down")),
            f"{min(utils):.3f}-{max(utils):.3f}" if utils else "-",
            f"{sum(tokens) / len(tokens):,.0f}" if tokens else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        if "error" in r:
            continue
        lines += [
            "",
            f"{r['system']} (`{r['command']}`), bytes from {r['bytes_source'] or 'nowhere (localhost)'}:",
            "",
        ]
        lines += [
            "| peer | inner steps | tokens | compute s | utilization | up | down |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in r["peers"]:
            cells = [
                p["name"],
                str(p["inner_steps"]),
                f"{p['tokens']:,}" if p["tokens"] is not None else "-",
                _num(p["compute_s"], ".1f"),
                _num(p["utilization"], ".3f"),
                _size(p["bytes_up"]),
                _size(p["bytes_down"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(results: list[dict[str, Any]], *, prefix: Path, target: float | None, title: str) -> list[Path]:
    """Held-out loss against wall time and against bytes per peer (up and down), one line per system."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is missing; pip install -e .[bench]", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("evals")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in done:
        ax.plot([e["t"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], marker="o", label=r["system"])
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax.set(xlabel="seconds since launch", ylabel="held-out loss (nats/token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    wall_png = prefix.with_name(prefix.name + "-loss-vs-wall.png")
    fig.tight_layout()
    fig.savefig(wall_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for r in done:
        points = [(e["up"], e["down"], e["val_loss"]) for e in r["evals"] if e["up"] is not None]
        if not points and r["system"].startswith("potluck"):  # localhost: potluck's own counts per round
            points = _potluck_app_bytes(r)
        if points:
            start = r["initial_val_loss"]
            axes[0].plot([0] + [u / 1e6 for u, _, _ in points], [start] + [v for *_, v in points], marker="o")
            axes[1].plot([0] + [d / 1e6 for _, d, _ in points], [start] + [v for *_, v in points], marker="o")
            axes[0].lines[-1].set_label(r["system"])
    measured = "" if any(e["up"] is not None for r in done for e in r["evals"]) else " (potluck's own counts)"
    for ax, what in zip(axes, ("uploaded", "downloaded"), strict=True):
        ax.set(xlabel=f"MB {what} per peer (mean){measured}", title=f"{title}: loss vs bytes {what}")
        if max((x for line in ax.lines for x in line.get_xdata()), default=0) > 1:
            ax.set_xscale("symlog", linthresh=0.1)  # DDP's hundreds of MB beside potluck's tens of kB
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/token)")
    if axes[0].lines:
        axes[0].legend()
    bytes_png = prefix.with_name(prefix.name + "-loss-vs-bytes.png")
    fig.tight_layout()
    fig.savefig(bytes_png, dpi=120)
    plt.close(fig)
    return [wall_png, bytes_png]


def _potluck_app_bytes(r: dict[str, Any]) -> list[tuple[float, float, float]]:
    """Per round, potluck's own cumulative bytes per peer (mean): what localhost can tell."""
    rows = r["raw"]["peers"]
    points, up, down = [], 0.0, 0.0
    for e in r["evals"]:
        sent = [x for p in rows for x in p["rounds"] if x["round"] == e["round"]]
        up += sum(x["bytes_up"] for x in sent) / len(rows)
        down += sum(x["bytes_down"] for x in sent) / len(rows)
        points.append((up, down, e["val_loss"]))
    return points


# ---------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that every `finally` (children, labs) runs."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main() -> None:
    """Run the chosen systems for each seed; print the tables; write JSON lines, Markdown and plots at --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--link", default="10mbit/100mbit", help="UP/DOWN per peer in the network lab; none: localhost"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list from {','.join(SYSTEMS)}")
    parser.add_argument("--seeds", default="0", help="comma list of run seeds (`--set seed=N` for every system)")
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE run-config override for every system (repeatable)"
    )
    parser.add_argument("--reference", default="potluck", help="the system others' times are divided by")
    parser.add_argument("--target", type=float, default=None, help="one target held-out loss [default: DDP's]")
    parser.add_argument(
        "--targets-from",
        type=Path,
        default=None,
        help="take each seed's DDP targets from this earlier run's JSON lines (DDP's loss per step does not depend "
        "on the link: run it on localhost once, and leave it out behind a slow one)",
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="hard limit for each system's run")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.jsonl, OUT.md and OUT-*.png")
    parser.add_argument(
        "--potluck-set", action="append", default=[], help="extra --set KEY=VALUE for potluck's swarms (repeatable)"
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the children's logs here [default: none]")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds:
        parser.error("--seeds: give at least one seed")
    link = None if args.link.lower() == "none" else args.link
    if link is not None:
        parse_link(link)  # ValueError with the form
    cfg = RunConfig().with_overrides({**parse_overrides(args.set), "rounds": args.rounds}, source="flags")
    params = sum(
        p.numel()
        for p in build_model(model_config(cfg.model.size, block_size=cfg.model.block_size), seed=0).parameters()
    )
    earlier = []
    if args.targets_from is not None:
        earlier = [json.loads(line) for line in args.targets_from.read_text().splitlines() if line.strip()]
    results: list[dict[str, Any]] = []
    seed_tables = []
    with _signals_exit(), tempfile.TemporaryDirectory(prefix="compare-systems-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for turn, seed in enumerate(seeds):
                setup = Setup(
                    peers=args.peers,
                    rounds=args.rounds,
                    link=link,
                    timeout_s=args.timeout_s,
                    log_dir=log_dir,
                    sets=(*args.set, f"seed={seed}"),
                    potluck_set=tuple(args.potluck_set),
                )
                order = systems[turn % len(systems) :] + systems[: turn % len(systems)]
                ran = []
                for system in order:
                    print(f"seed {seed}: running {system} ...", file=sys.stderr, flush=True)
                    started = time.monotonic()
                    try:
                        if system in POTLUCK_SYSTEMS:
                            result = run_potluck(setup, system=system)
                        else:
                            result = run_baseline(setup, system=system)
                    except BenchError as e:
                        result = {"system": system, "error": str(e)}
                    result["seed"] = seed
                    print(f"  {system}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
                    ran.append(result)
                ran.sort(key=lambda r: systems.index(r["system"]))
                source = [r for r in earlier if r.get("seed") == seed] if earlier else ran
                targets = seed_targets(source, total_steps=cfg.rounds * cfg.local_steps, target=args.target)
                summarize(ran, targets=targets)
                seed_tables.append(tables(ran, seed=seed))
                print(seed_tables[-1], flush=True)
                results += ran
        finally:
            stop(list(_LIVE))
    initial = {(r["system"], r["seed"]): r["initial_val_loss"] for r in results if r.get("initial_val_loss")}
    for seed in seeds:
        if len({round(v, 6) for (_, s), v in initial.items() if s == seed}) > 1:
            print(f"warning: seed {seed}: the systems' step-0 held-out losses differ: {initial}", file=sys.stderr)
    where = link or "localhost"
    header = (
        f"{args.peers} peers, {where}, {args.rounds} rounds x {cfg.local_steps} steps, model {cfg.model.size} "
        f"({params:,} parameters), batch {cfg.inner.batch_size}, seeds {seeds}; "
        f"{platform.machine()}, {os.cpu_count()} cores"
    )
    summary = over_seeds(results, reference=args.reference)
    volume = hivemind_volume(results, params=params, peers=args.peers)
    text = f"{header}\n\n{summary}\n\n{volume}\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.with_suffix(".jsonl").open("w") as f:
            for r in results:
                kept = {k: v for k, v in r.items() if k not in ("raw", "counters")}
                f.write(json.dumps(kept, separators=(",", ":")) + "\n")
        first = [r for r in results if r["seed"] == seeds[0]]
        target = next((r["targets"][-1] for r in first if r.get("targets")), None)
        pngs = plots(first, prefix=args.out, target=target, title=f"{args.peers} peers, {where}, seed {seeds[0]}")
        images = "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
        body = "\n\n".join(seed_tables)
        args.out.with_suffix(".md").write_text(f"{text}\n{body}\n\n{images}\n")


if __name__ == "__main__":
    main()
