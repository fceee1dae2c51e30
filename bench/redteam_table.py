"""The attack table: `potluck redteam --json` for each behaviour, one after another, collected as markdown.

Each attack runs three local swarms (attacked, clean, and for statistical attacks undefended) as real
processes; results are appended to OUT.jsonl as they come, so a partial sweep is not lost.

    python bench/redteam_table.py --peers 8 --adversaries 2 --rounds 6 --local-steps 10 \\
        --out bench/results/redteam-run1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.lab.children import run_launcher, sigterm_unwinds  # noqa: E402

ATTACKS = [
    "nan", "noise", "scaled", "sign-flip", "zero", "stale", "replay", "forged", "wrong-base",
    "alie", "ipm", "label-flip", "copycat", "sybil", "bitflip",
]  # fmt: skip


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def main() -> None:
    """Run every attack (or --attacks) and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--adversaries", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--set", action="append", default=["round_deadline_s=30"])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.jsonl and OUT.md")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = args.out.with_suffix(".jsonl")
    rows = []
    for attack in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        command = [sys.executable, "-m", "potluck", "redteam", "--attack", attack, "--peers", str(args.peers),
                   "--adversaries", str(args.adversaries), "--rounds", str(args.rounds),
                   "--local-steps", str(args.local_steps), "--json"]  # fmt: skip
        for item in args.set:
            command += ["--set", item]
        started = time.perf_counter()
        done = run_launcher(command)
        wall_s = time.perf_counter() - started
        if done.returncode != 0:
            report = {"attack": attack, "error": done.stderr.strip().splitlines()[-1:], "wall_s": wall_s}
        else:
            report = json.loads(done.stdout) | {"wall_s": wall_s}
        with open(jsonl, "a") as f:
            f.write(json.dumps(report) + "\n")
        rows.append(report)
        print(json.dumps({k: report.get(k) for k in ("attack", "tpr", "fpr", "loss_vs_clean", "wall_s")}), flush=True)
    lines = [
        "| attack | adversarial rejected | honest rejected | final loss | clean | vs clean | undefended | bars met |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attack']} | error: {r['error']} | | | | | | |")
            continue
        undefended = "-"
        if r.get("undefended_diverged"):
            undefended = "diverged"
        elif "undefended_final_val_loss" in r:
            undefended = f"{r['undefended_final_val_loss']:.3f} ({r['undefended_loss_vs_clean']:+.0%})"
        unmet = [name for name, ok in r["verdict"].items() if not ok]
        lines.append(
            f"| {r['attack']} | {r['adversarial_rejected']}/{r['adversarial_updates']} ({_pct(r['tpr'])}) "
            f"| {r['honest_rejected']}/{r['honest_updates']} ({_pct(r['fpr'])}) | {r['final_val_loss']:.3f} "
            f"| {r['clean_final_val_loss']:.3f} | {r['loss_vs_clean']:+.1%} | {undefended} "
            f"| {'all' if not unmet else 'NOT: ' + ', '.join(unmet)} |"
        )
    table = "\n".join(lines)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    with sigterm_unwinds():  # SIGTERM stops the running swarm and its processes, as Ctrl-C does
        main()
