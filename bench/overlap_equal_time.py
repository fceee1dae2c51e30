"""Overlap on vs off at equal wall time, over several seeds: is the held-out loss with overlap within 1%?

Each repeat runs the same swarm twice, one right after the other, with the same seed: `--overlap`
then `--no-overlap` (the order alternates between repeats, so neither always runs on a warmer
machine). The clock starts when round 0 closes (both runs pay the same start-up before it), and
the comparison point is the shorter run's last round close: there each run's held-out loss is read
off its curve, linearly interpolated between round closes. Reported per repeat and on average:
the loss at that equal time, the final loss at equal rounds, wall time per round, and the
difference with overlap, in percent (negative: overlap is better).

    python bench/overlap_equal_time.py --repeats 3 --out bench/results/overlap-equal-time-niced-peers
    python bench/overlap_equal_time.py --link 10mbit/100mbit ...   # in the network lab (root, iproute2)
    python bench/overlap_equal_time.py --peer-speeds 0.5,0.5,0.5,0.5 ...  # half of each step off the CPU
    python bench/overlap_equal_time.py --set model.size=10m ...     # any run setting, as `potluck swarm --set`
    python bench/overlap_equal_time.py --overlap-limit 0.5 ...      # overlapped steps at most half a round ahead
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.lab.children import run_launcher, sigterm_unwinds  # noqa: E402


def swarm(
    *,
    overlap: bool,
    seed: int,
    peers: int,
    rounds: int,
    link: str | None,
    settings: list[str],
    peer_speeds: str | None = None,
    overlap_limit: float | None = None,
) -> dict[str, Any]:
    """One `potluck swarm --json` run; its result with the command that made it."""
    command = [sys.executable, "-m", "potluck", "swarm", "--http-port", "0", "--peers", str(peers)]
    command += ["--rounds", str(rounds), "--overlap" if overlap else "--no-overlap", "--set", f"seed={seed}"]
    for setting in settings:
        command += ["--set", setting]
    if peer_speeds is not None:
        command += ["--peer-speeds", peer_speeds]
    if overlap and overlap_limit is not None:
        command += ["--overlap-limit", str(overlap_limit)]
    if link is not None:
        command += ["--link", link]
    command += ["--json"]
    done = run_launcher(command, timeout_s=1800)
    if done.returncode != 0:
        raise SystemExit(f"overlap={overlap} seed={seed}: {done.stderr.strip().splitlines()[-1]}")
    result = json.loads(done.stdout)
    result["command"] = " ".join(["potluck", *command[3:]])
    return result


def curve(result: dict[str, Any]) -> list[tuple[float, float]]:
    """(seconds since round 0 closed, held-out loss) at each round close."""
    rounds = result["rounds"]
    start = rounds[0]["time_s"]
    return [(r["time_s"] - start, r["val_loss"]) for r in rounds]


def loss_at(points: list[tuple[float, float]], t: float) -> float:
    """The held-out loss at time `t`, linearly interpolated between round closes (t within the curve)."""
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / (t1 - t0) if t1 > t0 else l1
    return points[-1][1]


def compare(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """One repeat's figures: losses at equal wall time and at equal rounds, seconds per round."""
    on_curve, off_curve = curve(on), curve(off)
    t = min(on_curve[-1][0], off_curve[-1][0])
    at_on, at_off = loss_at(on_curve, t), loss_at(off_curve, t)
    return {
        "equal_time_s": t,
        "loss_at_equal_time_on": at_on,
        "loss_at_equal_time_off": at_off,
        "equal_time_diff_pct": 100 * (at_on / at_off - 1),
        "final_loss_on": on["final_val_loss"],
        "final_loss_off": off["final_val_loss"],
        "equal_rounds_diff_pct": 100 * (on["final_val_loss"] / off["final_val_loss"] - 1),
        "s_per_round_on": on_curve[-1][0] / (len(on_curve) - 1),
        "s_per_round_off": off_curve[-1][0] / (len(off_curve) - 1),
        "honest_rejected_on": sum(p["rejected"] for p in on["peers"]),
        "honest_rejected_off": sum(p["rejected"] for p in off["peers"]),
        # of the overlapped run's inner steps, those taken before their round's base arrived
        "stale_share_on": sum(p.get("stale_steps", 0) for p in on["peers"])
        / max(1, sum(p["inner_steps"] for p in on["peers"])),
        "utilization_on": [p["compute_utilization"] for p in on["peers"]],
        "utilization_off": [p["compute_utilization"] for p in off["peers"]],
    }


def spread_of(values: list[float]) -> str:
    """The lowest and highest of a run's per-peer figures, as "0.91-0.94"."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else ""


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per repeat and the mean."""
    lines = [
        "| seed | equal time s | loss on | loss off | diff % | final on | final off | diff % (equal rounds) "
        "| s/round on | s/round off | rejected on/off | stale steps on | utilization on | utilization off |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['equal_time_s']:.1f} | {r['loss_at_equal_time_on']:.4f} | "
            f"{r['loss_at_equal_time_off']:.4f} | {r['equal_time_diff_pct']:+.2f} | {r['final_loss_on']:.4f} | "
            f"{r['final_loss_off']:.4f} | {r['equal_rounds_diff_pct']:+.2f} | {r['s_per_round_on']:.2f} | "
            f"{r['s_per_round_off']:.2f} | {r['honest_rejected_on']}/{r['honest_rejected_off']} | "
            f"{r.get('stale_share_on', 0):.0%} | {spread_of(r['utilization_on'])} | "
            f"{spread_of(r['utilization_off'])} |"
        )
    diffs = [r["equal_time_diff_pct"] for r in rows]
    finals = [r["equal_rounds_diff_pct"] for r in rows]
    spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    lines.append(
        f"| mean | | | | {statistics.mean(diffs):+.2f}{spread} | | | {statistics.mean(finals):+.2f} | "
        f"{statistics.mean(r['s_per_round_on'] for r in rows):.2f} | "
        f"{statistics.mean(r['s_per_round_off'] for r in rows):.2f} | | "
        f"{statistics.mean(r.get('stale_share_on', 0) for r in rows):.0%} | "
        f"{spread_of([u for r in rows for u in r['utilization_on']])} | "
        f"{spread_of([u for r in rows for u in r['utilization_off']])} |"
    )
    return "\n".join(lines)


def main() -> None:
    """Run the pairs, print the table, and keep JSON and Markdown next to `--out`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs, seeds FIRST..FIRST+N-1")
    parser.add_argument("--first-seed", type=int, default=0, help="the first pair's seed")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--link", default=None, help="UP/DOWN per peer in the network lab, e.g. 10mbit/100mbit")
    parser.add_argument(
        "--peer-speeds",
        default=None,
        help="e.g. 0.5,0.5,0.5,0.5: each step sleeps as long again, the CPU free meanwhile, as a GPU leaves it",
    )
    parser.add_argument(
        "--overlap-limit", type=float, default=None, help="the overlapped run's --overlap-limit (default: none)"
    )
    parser.add_argument("--set", dest="settings", action="append", default=[], help="a run setting, KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    rows, raw = [], []
    for seed in range(args.first_seed, args.first_seed + args.repeats):
        order = (True, False) if seed % 2 == 0 else (False, True)
        runs = {}
        for overlap in order:
            print(f"seed {seed}, overlap {'on' if overlap else 'off'} ...", file=sys.stderr, flush=True)
            runs[overlap] = swarm(
                overlap=overlap,
                seed=seed,
                peers=args.peers,
                rounds=args.rounds,
                link=args.link,
                settings=args.settings,
                peer_speeds=args.peer_speeds,
                overlap_limit=args.overlap_limit,
            )
        rows.append({"seed": seed, **compare(runs[True], runs[False])})
        raw.append({"seed": seed, "on": runs[True], "off": runs[False]})
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "runs": raw}, indent=1))
        commands = "\n".join(sorted({r[k]["command"] for r in raw for k in ("on", "off")}))
        args.out.with_suffix(".md").write_text(f"{text}\n\nCommands (python -m):\n```\n{commands}\n```\n")


if __name__ == "__main__":
    with sigterm_unwinds():  # SIGTERM stops the running swarm and its processes, as Ctrl-C does
        main()
