"""Sharded aggregators side by side with one: what each aggregator ingests, and whether the model still trains.

Issue 8's first bar: `potluck swarm --aggregators 2 --peers 4 --rounds 6` trains, and each of its two
aggregators ingests about half of what a single aggregator does for the same swarm. This runs
`potluck.lab.swarm.run_swarm` with 1, 2 (and optionally 4) aggregators, alternating, several times,
with the same config and peers, and reports per aggregator: the bytes it received (uploads, mostly),
the updates it took in, and its share of the single aggregator's ingest; per swarm: the held-out loss
before and after (the aggregator's, or in a sharded swarm peer-0's) and the wall time.

    python bench/sharded_swarm.py --peers 4 --rounds 6 --shards 1,2 --repeats 3 --out bench/results/sharded-swarm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.lab.swarm import SwarmOptions, run_swarm  # noqa: E402
from potluck.protocol.config import RunConfig  # noqa: E402


def measure(peers: int, rounds: int, aggregators: int) -> dict[str, Any]:
    """One swarm on the default tiny run (the README's), `aggregators` shards; what each aggregator took in."""
    cfg = RunConfig().with_overrides({"rounds": rounds}, source="bench")
    result = run_swarm(
        SwarmOptions(peers=peers, cfg=cfg, aggregators=aggregators, timeout_s=900), on_event=lambda *_: None
    )
    return {
        "aggregators": aggregators,
        "initial_val_loss": result.initial_val_loss,
        "final_val_loss": result.final_val_loss,
        "rounds": result.rounds_completed,
        "wall_s": result.wall_s,
        "hubs": result.aggregators,
        "peer_bytes_up": [p["bytes_up"] for p in result.peers],
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per aggregator per swarm, its ingest as a share of the same invocation's single one."""
    lines = [
        "| invocation | aggregators | aggregator | shard params | updates | ingest | share of 1 aggregator | "
        "held-out loss | wall |",
        "|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for run in runs:
        single = next(r for r in runs if r["invocation"] == run["invocation"] and r["aggregators"] == 1)
        base = single["hubs"][0]["bytes_in"]
        for hub in run["hubs"]:
            lines.append(
                f"| {run['invocation']} | {run['aggregators']} | {hub['name']} | {hub['num_params']:,} | "
                f"{hub['updates_accepted']} | {hub['bytes_in'] / 1e3:,.0f} kB | {hub['bytes_in'] / base:.2f} | "
                f"{run['initial_val_loss']:.3f} -> {run['final_val_loss']:.3f} | {run['wall_s']:.0f} s |"
            )
    shares: dict[int, list[float]] = {}
    for run in runs:
        single = next(r for r in runs if r["invocation"] == run["invocation"] and r["aggregators"] == 1)
        for hub in run["hubs"]:
            shares.setdefault(run["aggregators"], []).append(hub["bytes_in"] / single["hubs"][0]["bytes_in"])
    lines.append("")
    for count, values in sorted(shares.items()):
        lines.append(
            f"- {count} aggregator(s): ingest per aggregator {min(values):.2f}-{max(values):.2f} of one "
            f"aggregator's (median {statistics.median(values):.2f})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--shards", default="1,2", help="aggregator counts to compare; must include 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    counts = [int(c) for c in args.shards.split(",")]
    if 1 not in counts:
        parser.error("--shards must include 1: the ingest is reported as a share of one aggregator's")
    runs = []
    for invocation in range(1, args.repeats + 1):
        for count in counts:
            started = time.monotonic()
            run = {"invocation": invocation, **measure(args.peers, args.rounds, count)}
            runs.append(run)
            print(
                f"invocation {invocation}, {count} aggregator(s): {time.monotonic() - started:.0f} s", file=sys.stderr
            )
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores",
        "peers": args.peers,
        "rounds": args.rounds,
        "runs": runs,
    }
    text = table(runs)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(
            f"# Sharded aggregators vs one\n\n`{report['command']}` on {report['machine']}\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
