"""Late joiners fetching the state: from the aggregator alone, or from it and the peers that hold the state.

Issue 8, item 4: a joiner downloads the model state in chunks from several holders at once, so no single
donor is swamped (with hivemind, one donor serving every joiner is a long-standing complaint). This
runs, in the network lab (each node in its own namespace behind a shaped link), an aggregator and H
peers that hold the state, then J joiners arriving together, twice: with the holders serving chunks
(the default) and with `--no-serve-state`. It reports each joiner's time from start to a checked state
(the `synced` event), the bytes each donor gave, and so the aggregator's share of the upload.

The holders train at `--speed 0.01` (they mostly sleep), so the round stays open while the joiners
download and the CPU is left to the transfers. Needs root and iproute2 (the lab).

    python bench/state_sources.py --model 10m --holders 4 --joiners 4 --repeats 1 --out bench/results/state-sources
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.events import AggregatorReady, Event, PeerSynced  # noqa: E402
from potluck.lab.children import Child, read_events, start_child, stop_children  # noqa: E402
from potluck.lab.netlab import NetLab, parse_link  # noqa: E402
from potluck.protocol.config import RunConfig  # noqa: E402
from potluck.protocol.config_files import dump_run_config  # noqa: E402

E = TypeVar("E", bound=Event)

READY_S = 300.0


def _pump(child: Child, events: queue.Queue) -> None:
    for event in read_events(child):
        events.put((child.name, time.monotonic(), event))
    events.put((child.name, time.monotonic(), None))


def _wait(events: queue.Queue, want: set[str], kind: type[E], timeout_s: float) -> dict[str, tuple[float, E]]:
    """The first `kind` event of each child in `want`: (arrival time, event)."""
    got: dict[str, tuple[float, E]] = {}
    deadline = time.monotonic() + timeout_s
    while want - set(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"no {kind.KIND!r} event from {sorted(want - set(got))} within {timeout_s:.0f} s")
        try:
            name, at, event = events.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if event is None and name in want and name not in got:
            raise SystemExit(f"{name} exited before its {kind.KIND!r} event")
        if isinstance(event, kind) and name in want and name not in got:
            got[name] = (at, event)
    return got


def measure(args: argparse.Namespace, *, serve: bool) -> dict[str, Any]:
    """One lab: aggregator, holders, then joiners together; each joiner's sync time and who gave its chunks."""
    cfg = RunConfig().with_overrides(
        {"model.size": args.model, "rounds": 3, "round_deadline_s": args.deadline_s}, source="bench"
    )
    links = [parse_link(args.aggregator_link)] + [parse_link(args.peer_link)] * (args.holders + args.joiners)
    children: list[Child] = []
    events: queue.Queue = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="potluck-sources-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        (work / "run.toml").write_text(dump_run_config(cfg, "toml"))
        lab = stack.enter_context(NetLab(links))
        stack.callback(stop_children, children)

        def start(name: str, node: int, argv: list[str]) -> Child:
            child = start_child(name, argv, work_dir=work, threads=1, wrap=lambda a: lab.command(node, a))
            children.append(child)
            threading.Thread(target=_pump, args=(child, events), daemon=True).start()
            return child

        start(
            "aggregator",
            0,
            ["aggregator", "--config", str(work / "run.toml"), "--state-dir", str(work / "aggregator")]
            + ["--host", lab.addresses[0], "--http-port", "0", "--threads", "1", "--json"],
        )
        ready = _wait(events, {"aggregator"}, AggregatorReady, READY_S)["aggregator"][1]
        join = ready.maddrs[0]

        def peer(name: str, node: int, *extra: str) -> None:
            argv = ["peer", "--join", join, "--identity", str(work / f"{name}.key"), "--threads", "1", "--json"]
            argv += ["--receipts", str(work / f"{name}-receipts"), *extra]
            if not serve:
                argv.append("--no-serve-state")
            start(name, node, argv)

        holders = [f"holder-{i}" for i in range(args.holders)]
        for i, name in enumerate(holders):
            peer(name, 1 + i, "--speed", "0.01")
        held = _wait(events, set(holders), PeerSynced, READY_S)
        joiners = [f"joiner-{i}" for i in range(args.joiners)]
        started = time.monotonic()
        for i, name in enumerate(joiners):
            peer(name, 1 + args.holders + i, "--speed", "0.01")
        synced = _wait(events, set(joiners), PeerSynced, READY_S)
        rows = []
        for name in joiners:
            at, event = synced[name]
            sources = event.state_sources
            rows.append(
                {
                    "joiner": name,
                    "sync_s": at - started,
                    "state_bytes": event.state_bytes,
                    "from_aggregator": sources.get(ready.fingerprint, 0),
                    "from_peers": sum(b for k, b in sources.items() if k != ready.fingerprint),
                    "donors": sum(1 for b in sources.values() if b),
                    "offered": len(sources),  # donors tried, the aggregator included
                }
            )
        return {
            "serve_state": serve,
            "holder_sync_s": max(at for at, _ in held.values()) - min(at for at, _ in held.values()),
            "joiners": rows,
            "all_synced_s": max(r["sync_s"] for r in rows),
        }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per run, the joiners' sync times and where their bytes came from."""
    lines = [
        "| repeat | holders serve | joiners' sync, median / slowest | aggregator's share of the bytes | "
        "donors per joiner | slowest vs aggregator alone |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        base = next(r for r in runs if r["repeat"] == run["repeat"] and not r["serve_state"])
        sync = [r["sync_s"] for r in run["joiners"]]
        total = sum(r["from_aggregator"] + r["from_peers"] for r in run["joiners"])
        share = sum(r["from_aggregator"] for r in run["joiners"]) / total if total else 0.0
        donors = statistics.median(r["donors"] for r in run["joiners"])
        lines.append(
            f"| {run['repeat']} | {'yes' if run['serve_state'] else 'no'} | {statistics.median(sync):.1f} s / "
            f"{max(sync):.1f} s | {share:.0%} | {donors:g} | {run['all_synced_s'] / base['all_synced_s']:.2f}x |"
        )
    return "\n".join(lines)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="10m")
    parser.add_argument("--holders", type=int, default=4)
    parser.add_argument("--joiners", type=int, default=4)
    parser.add_argument("--aggregator-link", default="50mbit/1gbit", help="UP/DOWN of the aggregator's link")
    parser.add_argument("--peer-link", default="10mbit/100mbit", help="UP/DOWN of every peer's link")
    parser.add_argument("--deadline-s", type=float, default=600.0, help="round deadline: the round stays open")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every child, p2pd and namespace of the lab is removed on the way out
    signal.signal(signal.SIGTERM, _interrupt)
    runs = []
    for repeat in range(1, args.repeats + 1):
        for serve in (False, True):
            run = measure(args, serve=serve) | {"repeat": repeat}
            runs.append(run)
            print(json.dumps(run), flush=True)
    report = table(runs)
    print(report)
    if args.out is not None:
        meta = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d"),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
        args.out.with_suffix(".md").write_text(report + "\n")


if __name__ == "__main__":
    main()
