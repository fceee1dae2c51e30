"""Overlap on vs off, time-boxed vs fixed local steps, late updates refused vs discounted: real local swarms.

Each configuration is one `potluck swarm --json` run (real aggregator and peer processes); the runs go
one after another in one invocation so they share the machine's state. Reported per run: wall time,
held-out loss, and per peer its speed, inner steps, tokens, accepted updates and compute utilization
(time in inner steps / wall time from its first step to its last).

    python bench/overlap_heterogeneity.py --out bench/results/overlap-heterogeneity
    python bench/overlap_heterogeneity.py --link 10mbit/100mbit ...   # in the network lab (root, iproute2)
    python bench/overlap_heterogeneity.py --only "late peer, late_updates=reject" \
        --only "late peer, late_updates=discount" --out bench/results/late-updates
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.lab.children import run_launcher, sigterm_unwinds  # noqa: E402

RUNS: dict[str, list[str]] = {
    "overlap on": ["--peers", "4", "--rounds", "6", "--overlap"],
    "overlap off": ["--peers", "4", "--rounds", "6", "--no-overlap"],
    "heterogeneous, fixed steps": ["--peers", "3", "--rounds", "6", "--peer-speeds", "1,0.5,0.25"],
    "heterogeneous, time-boxed 3 s": [
        "--peers",
        "3",
        "--rounds",
        "6",
        "--peer-speeds",
        "1,0.5,0.25",
        "--set",
        "round_deadline_s=3",
    ],
}
# A peer whose every update misses the 3 s deadline (one inner step takes it ~5 s): refused, or taken into
# the next round at half weight (RunConfig.late_updates).
for _policy in ("reject", "discount"):
    RUNS[f"late peer, late_updates={_policy}"] = [
        *("--peers", "3", "--rounds", "6", "--peer-speeds", "1,1,0.02"),
        *("--set", "round_deadline_s=3", "--set", f"late_updates={_policy}"),
    ]


def run(name: str, args: list[str], *, link: str | None) -> dict[str, Any]:
    """One swarm; its --json result with the command that made it."""
    command = [sys.executable, "-m", "potluck", "swarm", "--http-port", "0", *args, "--json"]
    if link is not None:
        command[4:4] = ["--link", link]
    started = time.monotonic()
    done = run_launcher(command, timeout_s=1800)
    if done.returncode != 0:
        raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
    result = json.loads(done.stdout)
    result["name"] = name
    result["command"] = " ".join(["potluck", *command[3:]])
    result["elapsed_s"] = time.monotonic() - started
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per peer of every run."""
    lines = [
        "| run | wall s | held-out loss | peer | speed | inner steps | tokens | accepted | utilization |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for i, p in enumerate(r["peers"]):
            head = [r["name"], f"{r['wall_s']:.1f}", f"{r['final_val_loss']:.4f}"] if i == 0 else ["", "", ""]
            util = p["compute_utilization"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        *head,
                        p["name"],
                        f"{p['speed']:g}",
                        str(p["inner_steps"]),
                        f"{p['tokens']:,}",
                        f"{p['accepted']}/{p['accepted'] + p['rejected']}",
                        "-" if util is None else f"{util:.3f}",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run every configuration, print the table, and keep JSON and Markdown next to `--out`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--link", default=None, help="UP/DOWN per peer in the network lab, e.g. 10mbit/100mbit")
    parser.add_argument("--only", action="append", default=None, help="run only these (repeatable)")
    args = parser.parse_args()
    results = []
    for name, run_args in RUNS.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run(name, run_args, link=args.link))
    text = table(results)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        commands = "\n".join(f"- {r['name']}: `{r['command']}`" for r in results)
        args.out.with_suffix(".md").write_text(f"{text}\n\nCommands:\n{commands}\n")


if __name__ == "__main__":
    with sigterm_unwinds():  # SIGTERM stops the running swarm and its processes, as Ctrl-C does
        main()
