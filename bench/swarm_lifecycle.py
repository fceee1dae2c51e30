"""Where a local swarm's wall time goes outside its rounds: starting the processes, joining, exiting.

A swarm on one machine starts an aggregator and N peers as separate processes. Each one imports
torch and hivemind and starts a p2pd before it can join, and at the end each one tears down its
interpreter. On a small machine those two phases take most of a short run's time (and most of the
multi-process tests' time). This runs `potluck.lab.swarm.run_swarm` once and timestamps its events:

- ready: the aggregator serves (from launch)
- joined: the last peer has asked for the state
- synced: the last peer has the state checked and loaded
- rounds: the first round closes, then the rest
- done: the last process reports done
- exited: every process has exited (its stdout closed)

    python bench/swarm_lifecycle.py --peers 8 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.events import AggregatorReady, Event, Joined, PeerDone, PeerSynced, RoundClosed  # noqa: E402
from potluck.lab import swarm  # noqa: E402
from potluck.protocol.config import RunConfig  # noqa: E402


def measure(peers: int, rounds: int) -> dict[str, Any]:
    """One swarm of `peers` on the tiny model (3 inner steps a round); seconds from launch to each phase."""
    cfg = RunConfig().with_overrides(
        {
            "rounds": rounds,
            "local_steps": 3,
            "inner.warmup_steps": 2,
            "inner.batch_size": 8,
            "data.max_bytes": 400_000,
            "round_deadline_s": 20.0,
        },
        source="bench",
    )
    started = time.monotonic()
    marks: dict[str, float] = {}
    closed: list[float] = []
    pump = swarm.pump

    def timed_pump(child: swarm.Child, events: Any) -> None:
        pump(child, events)
        marks["exited"] = time.monotonic() - started  # the last stdout to close wins

    def on_event(child: str, event: Event) -> None:
        now = time.monotonic() - started
        if child == "aggregator" and isinstance(event, AggregatorReady):
            marks["ready"] = now
        elif child == "aggregator" and isinstance(event, Joined):
            marks["joined"] = now
        elif child == "aggregator" and isinstance(event, RoundClosed):
            closed.append(now)
        elif isinstance(event, PeerSynced):
            marks["synced"] = now
        elif isinstance(event, PeerDone):
            marks["done"] = now

    swarm.pump = timed_pump
    try:
        swarm.run_swarm(swarm.SwarmOptions(peers=peers, cfg=cfg, timeout_s=600), on_event=on_event)
    finally:
        swarm.pump = pump
    marks["total"] = time.monotonic() - started
    return {
        "peers": peers,
        "rounds": rounds,
        **{k: round(v, 2) for k, v in marks.items()},
        "first_round_closed": round(closed[0], 2),
        "last_round_closed": round(closed[-1], 2),
        "exit_after_done_s": round(marks["exited"] - marks["done"], 2),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    """Measure one swarm and print a markdown row (or the JSON object with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = measure(args.peers, args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    print("| peers | ready | last joined | last synced | 1st round closed | last round closed | done | exited |")
    print("|---|---|---|---|---|---|---|---|")
    r = result
    print(
        f"| {r['peers']} | {r['ready']} | {r['joined']} | {r['synced']} | {r['first_round_closed']} "
        f"| {r['last_round_closed']} | {r['done']} | {r['exited']} |"
    )


if __name__ == "__main__":
    main()
