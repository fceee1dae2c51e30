"""Where a round's wall time goes in a real local swarm: compute, upload, aggregation, download, waiting.

Runs `potluck swarm --json` (one aggregator and N peers as separate processes on 127.0.0.1, through
hivemind's DHT and libp2p streams) and splits every round from the events the nodes report:

- compute: the peer's inner steps plus encoding (`compute_s`)
- upload: from opening the submit stream to the signed receipt (`upload_s`)
- wait: from asking for the aggregate to its first byte (the slowest peer's compute, then aggregation)
- aggregation: the aggregator's decode-mean-encode-step-checkpoint (`aggregation_s`)
- download: from the aggregate's first byte to its last (`download_s`)

and counts bytes up and down per peer per round on the wire (frames, envelopes and payloads).

    python bench/swarm_rounds.py --peers 3 --rounds 12 --out bench/results/swarm-rounds
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.lab.children import run_launcher, sigterm_unwinds  # noqa: E402


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def main() -> None:
    """Run one swarm and print a markdown table of per-round means (first round left out: start-up)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json (raw swarm result) and OUT.md")
    args = parser.parse_args()

    command = [
        sys.executable,
        "-m",
        "potluck",
        "swarm",
        "--peers",
        str(args.peers),
        "--rounds",
        str(args.rounds),
        "--json",
    ]
    if args.local_steps is not None:
        command += ["--local-steps", str(args.local_steps)]
    started = time.perf_counter()
    done = run_launcher(command)
    done.check_returncode()
    wall_s = time.perf_counter() - started
    result = json.loads(done.stdout)

    rows = []
    for closed in result["rounds"][1:]:
        r = closed["round"]
        per_peer = [e for p in result["peers"] for e in p["rounds"] if e["round"] == r]
        rows.append(
            {
                "round": r,
                "wall_s": closed["round_s"],
                "compute_s": _mean([e["compute_s"] for e in per_peer]),
                "upload_s": _mean([e["upload_s"] for e in per_peer]),
                "wait_s": _mean([e["wait_s"] for e in per_peer]),
                "aggregation_s": closed["aggregation_s"],
                "download_s": _mean([e["download_s"] for e in per_peer]),
                "receipt_s": _mean([e.get("receipt_s", 0.0) for e in per_peer]),
                "bytes_up": _mean([e["bytes_up"] for e in per_peer]),
                "bytes_down": _mean([e["bytes_down"] for e in per_peer]),
            }
        )
    keys = ["wall_s", "compute_s", "upload_s", "wait_s", "aggregation_s", "download_s", "receipt_s"]
    keys += ["bytes_up", "bytes_down"]
    means = {k: _mean([row[k] for row in rows]) for k in keys}
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    lines = [
        f"`{' '.join(['potluck', *command[3:]])}` on {machine}: {wall_s:.1f} s in all, "
        f"held-out loss {result['initial_val_loss']:.3f} -> {result['final_val_loss']:.3f}, "
        f"{result['num_params']:,} parameters; means over rounds 1-{args.rounds - 1} (round 0 includes start-up).",
        "",
        "| round wall | compute | upload | wait | aggregation | download | receipt | bytes up/peer "
        "| bytes down/peer |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {means['wall_s']:.3f} s | {means['compute_s']:.3f} s | {means['upload_s'] * 1000:.1f} ms "
        f"| {means['wait_s']:.3f} s | {means['aggregation_s'] * 1000:.1f} ms | {means['download_s'] * 1000:.2f} ms "
        f"| {means['receipt_s'] * 1000:.1f} ms | {means['bytes_up']:,.0f} | {means['bytes_down']:,.0f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "means": means, "swarm": result}, indent=1))
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    with sigterm_unwinds():  # SIGTERM stops the running swarm and its processes, as Ctrl-C does
        main()
