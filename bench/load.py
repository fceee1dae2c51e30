"""The aggregator under load: hundreds to thousands of volunteer identities against one real aggregator process.

A real `potluck aggregator` is started on 127.0.0.1 (as `potluck swarm` starts it) with the run's config, then
`--workers` worker processes (bench/load_worker.py), which share the identities between them. Each identity has
its own Ed25519 key (what the aggregator keys its rounds, members and limits on) and does what a volunteer's
peer does, minus the training: joins (manifest; a fraction also download the state), submits a real signed
update of the run's size and codec each round, long-polls the aggregate, fetches its final receipt.

Identities share libp2p nodes, `--per-node` each (a p2pd per identity is ~40 MB and a process of its own; with
4 per node every identity long-polls as a real peer does, within the aggregator's per-peer caps, which the
nodes respect client-side). The aggregator's limits are its own: nothing is loosened; refusals are counted.

Shards (`--shards S`): the run's config lists S aggregator keys, and only shard 0's aggregator runs, as
bench/aggregator_ingest.py measures it: the S aggregators of a sharded run do not talk to each other, each
takes every peer's slice of its own tensors, so shard 0's (the largest or about so) is the round's slowest.
Its rounds skip the held-out check (a shard's aggregator holds part of the model).

Rounds: the workers join every identity, then start together; the first round is a warm-up (joiners are not
yet members, attendance.py), the next `--rounds` are measured. Per round (one status line on stderr, one row in
the JSON): close time (the aggregator's round_s, open to published, and its aggregation_s), ingest (the bytes
the identities' uploads of the round carried, over its collection time and over its wall time), submit latency p50/p99
(first try to signed receipt, retries included), refusals by code and stage, the aggregator's CPU and peak
RSS from /proc (its p2pd counted apart), /api/status latency, the DHT records' sizes.

    nice -n 19 python -m bench.load --model tiny --identities 10,100,1000 --workers 2 --per-node 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.load_probes import DhtProbe, ProcSampler, StatusProber
from potluck.cli.aggregator import AggregatorFlags
from potluck.events import AggregatorReady, Event, RoundClosed
from potluck.lab.children import Child, read_events, read_json_lines, sigterm_unwinds, start_child, stop_children
from potluck.protocol.config import RunConfig
from potluck.protocol.config_files import dump_run_config, parse_overrides
from potluck.protocol.identity import load_or_create_identity, public_key_to_hex
from potluck.tasks import created

READY_TIMEOUT_S = 180.0
# The workers yield the cores to the aggregator, whose numbers are the point: their sessions' autogroups get this
# nice value (potluck.lab.priority), the aggregator's keeps the default.
WORKER_NICE = 10
RESULTS = Path(__file__).parent / "results"

Line = tuple[str, Any]  # (child name, its event or JSON line; None when its stdout closed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pump_events(child: Child, lines: queue.Queue[Line]) -> None:
    for event in read_events(child):
        lines.put((child.name, event))
    lines.put((child.name, None))


def _pump_json(child: Child, lines: queue.Queue[Line]) -> None:
    for line in read_json_lines(child):
        lines.put((child.name, line))
    lines.put((child.name, None))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def _config(args: argparse.Namespace, work_dir: Path) -> Path:
    overrides: dict[str, Any] = {"model.size": args.model, "round_deadline_s": args.deadline, "rounds": 10_000}
    if args.shards > 1:  # every shard's key is listed; only shard 0's aggregator runs (see the module docstring)
        keys = [load_or_create_identity(_shard_key(work_dir, s))[0].public_key for s in range(args.shards)]
        overrides |= {"shards": args.shards, "aggregator_keys": [public_key_to_hex(k) for k in keys]}
    overrides |= parse_overrides(args.set)
    cfg = created(RunConfig().with_overrides(overrides, source="bench/load.py"))
    path = work_dir / "run.toml"
    path.write_text(dump_run_config(cfg, "toml"))
    return path


def _shard_key(work_dir: Path, shard: int) -> Path:
    return work_dir / f"aggregator-{shard}.key"


def _start_workers(
    args: argparse.Namespace, identities: int, *, join: str, work_dir: Path, lines: queue.Queue[Line]
) -> list[Child]:
    workers = []
    share, extra = divmod(identities, args.workers)
    first = 0
    for w in range(args.workers):
        count = share + (w < extra)
        if count == 0:
            continue
        argv = ["--join", join, "--worker", str(w), "--first", str(first)]
        argv += ["--count", str(count), "--per-node", str(args.per_node), "--rounds", str(args.rounds + 1)]
        argv += ["--download-fraction", str(args.download_fraction), "--spread", str(args.spread)]
        argv += ["--go-file", str(work_dir / "go"), "--timeout", str(args.timeout)]
        child = start_child(
            f"worker-{w}",
            argv,
            work_dir=work_dir,
            threads=1,
            module="bench.load_worker",
            nice=args.worker_nice,
        )
        workers.append(child)
        threading.Thread(target=_pump_json, args=(child, lines), daemon=True).start()
        first += count
    return workers


def run_load(
    args: argparse.Namespace, identities: int, *, on_line: Any = None, children: list[Child] | None = None
) -> dict[str, Any]:
    """One load run at `identities`: start the aggregator and the workers, follow the rounds, stop everything.

    `on_line` takes each round's status line (default: stderr); `children`, when given, gets every child started.
    """
    say = on_line or (lambda text: print(text, file=sys.stderr, flush=True))
    started = time.monotonic()
    children = [] if children is None else children
    lines: queue.Queue[Line] = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="potluck-load-") as tmp:
        work_dir = Path(tmp) if args.work_dir is None else args.work_dir / f"{args.model}-{identities}"
        work_dir.mkdir(parents=True, exist_ok=True)
        probes: list[Any] = []
        try:
            config = _config(args, work_dir)
            port = _free_port()
            flags = AggregatorFlags(
                config=config,
                state_dir=work_dir / "aggregator",
                host="127.0.0.1",
                threads=args.aggregator_threads,
                http_port=port,
                as_json=True,
                identity=_shard_key(work_dir, 0) if args.shards > 1 else None,
                max_connections=args.max_connections,
            )
            argv = ["--verbose", *flags.command()] if args.verbose else flags.command()
            aggregator = start_child("aggregator", argv, work_dir=work_dir, threads=args.aggregator_threads)
            children.append(aggregator)
            threading.Thread(target=_pump_events, args=(aggregator, lines), daemon=True).start()
            ready = _wait_ready(aggregator, lines, started + max(READY_TIMEOUT_S, args.timeout / 2))
            join = ready.maddrs[0]
            sampler, status = ProcSampler(aggregator.process.pid), StatusProber(port)
            sampler.start()
            status.start()
            probes += [sampler, status]
            dht = DhtProbe(join) if args.dht else None
            if dht is not None:
                probes.append(dht)
                dht.start()
            workers = _start_workers(args, identities, join=join, work_dir=work_dir, lines=lines)
            children += workers
            run = _Follow(identities, len(workers), sampler, status, dht, say=say, deadline=started + args.timeout)
            run.follow(lines, go=work_dir / "go")
            result = run.result(ready)
        except BaseException:
            for child in children:  # the work directory goes with the run: show why here
                tail = child.log_path.read_text(errors="replace").splitlines()[-8:] if child.log_path.exists() else []
                print(f"--- {child.name} log, last lines:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            for probe in probes:
                if isinstance(probe, DhtProbe):
                    probe.stop()
                else:
                    probe.halt.set()
            stop_children(children)
    result |= {
        "identities": identities,
        "model": args.model,
        "shards": args.shards,
        "wall_s": round(time.monotonic() - started, 1),
    }
    return result


def _wait_ready(aggregator: Child, lines: queue.Queue[Line], deadline: float) -> AggregatorReady:
    while time.monotonic() < deadline:
        try:
            _, event = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if event is None:
            raise SystemExit(f"the aggregator exited before it was ready (log: {aggregator.log_path})")
        if isinstance(event, AggregatorReady):
            return event
    raise SystemExit("the aggregator was not ready in time")


class _Follow:
    """The run's lines as they come: the aggregator's round events and the workers' round tallies, merged."""

    def __init__(
        self,
        identities: int,
        workers: int,
        sampler: ProcSampler,
        status: StatusProber,
        dht: DhtProbe | None,
        *,
        say: Any,
        deadline: float,
    ) -> None:
        self.identities = identities
        self.workers = workers
        self.sampler = sampler
        self.status = status
        self.dht = dht
        self.say = say
        self.deadline = deadline
        self.ready: list[dict[str, Any]] = []
        self.closes: dict[int, RoundClosed] = {}
        self.tallies: dict[int, list[dict[str, Any]]] = {}
        self.dht_sizes: dict[int, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.go_s = 0.0

    def follow(self, lines: queue.Queue[Line], *, go: Path) -> None:
        """Until every worker is done: start them together, and report each round once all of it is in."""
        done: set[str] = set()
        while len(done) < self.workers or self.tallies:  # a last round's close may come after its tallies
            if time.monotonic() > self.deadline:
                raise SystemExit("the load run passed its --timeout")
            try:
                name, line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                if name not in done:
                    raise SystemExit(f"{name} exited before the run's end (see its log in the work directory)")
                continue
            if isinstance(line, RoundClosed):
                self.closes[line.round] = line
                if self.dht is not None:
                    self.dht_sizes[line.round] = self.dht.sizes()
            elif isinstance(line, Event):
                continue
            elif line.get("event") == "ready":
                self.ready.append(line)
                if len(self.ready) == self.workers:
                    self.go_s = time.time()
                    go.touch()
            elif line.get("event") == "round":
                self.tallies.setdefault(line["round"], []).append(line)
            elif line.get("event") == "done":
                done.add(name)
            self._report()

    def _report(self) -> None:
        """Report every round whose close and every worker's tally are in, in order."""
        while True:
            r = min(self.tallies, default=None)
            if r is None or r not in self.closes or len(self.tallies[r]) < self.workers:
                return
            self.rows.append(self._row(self.closes.pop(r), self.tallies.pop(r), warmup=not self.rows))
            self.say(_status_line(self.rows[-1]))

    def _row(self, closed: RoundClosed, tallies: list[dict[str, Any]], *, warmup: bool) -> dict[str, Any]:
        submit = [s for t in tallies for s in t["submit_s"]]
        refused: Counter[str] = Counter()
        for t in tallies:
            refused.update(t["refused"])
        # the round's uploads as the identities sent them: the aggregator's own total is read when its close is
        # reported, and with a slow close (the 10m model) the next round's first uploads are in it already
        bytes_in = sum(t["bytes_up"] for t in tallies)
        collect_s = max(closed.round_s - closed.aggregation_s, 1e-9)
        end_s = closed.time_s
        start_s = end_s - closed.round_s
        return {
            "round": closed.round,
            "warmup": warmup,
            "closed_by": closed.closed_by,
            "round_s": round(closed.round_s, 3),
            "aggregation_s": round(closed.aggregation_s, 3),
            "accepted": len(closed.accepted),
            "rejected": closed.rejected,
            "density": closed.density,
            "upload_bytes": bytes_in // max(1, sum(len(t["submit_s"]) for t in tallies)),
            "ingest_mb_s": round(bytes_in / collect_s / 1e6, 3),
            "ingest_wall_mb_s": round(bytes_in / closed.round_s / 1e6, 3),
            "submit_p50_s": _quantile(submit, 0.5),
            "submit_p99_s": _quantile(submit, 0.99),
            "poll_p50_s": _quantile([s for t in tallies for s in t["poll_s"]], 0.5),
            "receipt_p50_s": _quantile([s for t in tallies for s in t["receipt_s"]], 0.5),
            "receipts_accepted": sum(t["accepted"] for t in tallies),
            "credited": sum(t["credited"] for t in tallies),
            "refused": dict(refused),
            **self.sampler.window(start_s, end_s),
            **self.status.window(start_s, end_s),
            "dht": self.dht_sizes.get(closed.round),
        }

    def result(self, ready: AggregatorReady) -> dict[str, Any]:
        """The run's JSON: its setup, the workers' joins, and one row per round."""
        measured = [r for r in self.rows if not r["warmup"]]
        errors = sum(sum(r["refused"].values()) for r in measured)
        return {
            "num_params": ready.num_params,
            "codec": ready.codec,
            "round_deadline_s": ready.round_deadline_s,
            "joins": [{k: v for k, v in w.items() if k != "event"} for w in self.ready],
            "rounds": self.rows,
            "summary": {
                "round_s_max": max((r["round_s"] for r in measured), default=None),
                "ingest_mb_s_min": min((r["ingest_mb_s"] for r in measured), default=None),
                "submit_p99_s_max": max((r["submit_p99_s"] or 0 for r in measured), default=None),
                "rss_mb_max": max((r["rss_mb"] or 0 for r in measured), default=None),
                "all_accepted": all(r["accepted"] == self.identities for r in measured),
                "refusals": errors,
            },
        }


def _status_line(row: dict[str, Any]) -> str:
    refused = ",".join(f"{k}={v}" for k, v in sorted(row["refused"].items())) or "none"
    return (
        f"round {row['round']}{' (warm-up)' if row['warmup'] else ''}: {row['accepted']} accepted, "
        f"closed by {row['closed_by']} in {row['round_s']:.2f} s (aggregation {row['aggregation_s']:.2f} s), "
        f"ingest {row['ingest_mb_s']:.2f} MB/s, submit p50/p99 {row['submit_p50_s']}/{row['submit_p99_s']} s, "
        f"cpu {row['cpu']} rss {row['rss_mb']} MB (p2pd cpu {row['p2pd_cpu']} rss {row['p2pd_rss_mb']} MB), "
        f"status p50 {row['status_p50_s']} s, refused {refused}"
    )


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="built-in model size (potluck's MODEL_SIZES)")
    p.add_argument("--identities", default="10,100", help="volunteer identities per run, comma-separated")
    p.add_argument("--workers", type=int, default=2, help="worker processes sharing the identities")
    p.add_argument("--per-node", type=int, default=4, help="identities per libp2p node (a p2pd each)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up round")
    p.add_argument("--shards", type=int, default=1, help="the run's shards: the load goes to shard 0's aggregator")
    p.add_argument("--deadline", type=float, default=120.0, help="the run's round_deadline_s")
    p.add_argument("--download-fraction", type=float, default=0.1, help="identities that download the whole state")
    p.add_argument("--spread", type=float, default=0.0, help="each upload waits uniform [0, SPREAD] s (0: a burst)")
    p.add_argument(
        "--max-connections",
        type=int,
        default=AggregatorFlags.model_fields["max_connections"].default,
        help="the aggregator's --max-connections, its p2pd's (default: the aggregator's)",
    )
    p.add_argument("--aggregator-threads", type=int, default=os.cpu_count() or 1, help="its torch threads")
    p.add_argument("--worker-nice", type=int, default=WORKER_NICE, help="the workers' CPU priority (0: the same)")
    p.add_argument("--set", action="append", default=[], help="another run config override KEY=VALUE; repeatable")
    p.add_argument("--no-dht", dest="dht", action="store_false", help="do not look the DHT records up each round")
    p.add_argument("--timeout", type=float, default=1800.0, help="stop a run after this many seconds")
    p.add_argument("--out", type=Path, help=f"result file (default: {RESULTS}/load-MODEL-N.json)")
    p.add_argument(
        "--verbose", action="store_true", help="the aggregator logs what each step does (its log: --work-dir)"
    )
    p.add_argument("--work-dir", type=Path, help="keep the logs and state here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print each run's result as one JSON line on stdout")
    return p


def main() -> None:
    """Run each identity count in turn; write each result, compact, under bench/results/."""
    args = parser().parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"
    with sigterm_unwinds():
        for n in (int(x) for x in args.identities.split(",")):
            result = run_load(args, n) | {"machine": machine, "command": " ".join(sys.argv)}
            shards = f"-{args.shards}shards" if args.shards > 1 else ""
            out = args.out or RESULTS / f"load-{args.model}{shards}-{n}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
            if args.json:
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
