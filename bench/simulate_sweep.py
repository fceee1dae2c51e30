"""Sweep `potluck simulate` over codecs x local steps x outer optimizer, at equal tokens.

Every cell of the grid trains for the same number of inner steps per peer (rounds x local steps is
held fixed), and every configuration runs its own DDP arm in the same process, so each gap and
ratio is measured side by side. Prints a markdown table (as in docs/experiments/simulate-sweeps.md)
and, with --json-out, writes every arm's full result (including its per-round held-out loss curve).

    python bench/simulate_sweep.py --peers 4 --inner-steps 480 --local-steps 15,30,60 \\
        --outer nesterov,average --codecs none,int8,topk,dct-topk --json-out bench/results/sweep.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from potluck.planning.simulate import parse_arm, simulate
from potluck.protocol.config import RunConfig
from potluck.training.device import pick_device


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> None:
    """Run the grid and print one markdown row per arm."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=480, help="inner steps per peer, the same in every cell")
    parser.add_argument("--local-steps", default="15,30,60", help="comma-separated H values")
    parser.add_argument("--outer", default="nesterov,average", help="kind[:lr=X:momentum=Y], comma-separated")
    parser.add_argument("--codecs", default="none,int8,topk,dct-topk")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="peak inner lr (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    device = pick_device("auto")
    rows: list[dict[str, object]] = []
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}",
        flush=True,
    )
    print(
        "| H | rounds | outer | arm | val loss | gap vs DDP | B/param/kstep up | B/param/round down | "
        "upload reduction vs DDP | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for local_steps in (int(h) for h in _csv(args.local_steps)):
        rounds = max(1, args.inner_steps // local_steps)
        for outer_text in _csv(args.outer):
            # "nesterov", "average", or "nesterov:lr=0.4:momentum=0.5"
            outer, kind, outer_params = parse_arm(outer_text)
            inner = {"batch_size": args.batch_size} | ({"lr": args.lr} if args.lr else {})
            cfg = RunConfig.model_validate(
                {
                    "model": {"size": args.model},
                    "inner": inner,
                    "outer": {"kind": kind} | outer_params,
                    "local_steps": local_steps,
                    "rounds": rounds,
                    "seed": args.seed,
                }
            )
            started = time.perf_counter()
            result = simulate(
                cfg, peers=args.peers, codecs=_csv(args.codecs), device=device, eval_batches=args.eval_batches
            )
            for arm in result.arms:
                print(
                    f"| {local_steps} | {rounds} | {outer} | {arm.name} | {arm.val_loss:.4f} | {arm.gap_pct:+.2f}% | "
                    f"{arm.upload_bytes_per_param_per_kstep:.3g} | {arm.download_bytes_per_param_per_round:.3g} | "
                    f"{arm.reduction_vs_ddp:,.0f}x | {arm.wall_s:.0f} |",
                    flush=True,
                )
            rows.append(
                {"local_steps": local_steps, "outer": outer, "wall_s": time.perf_counter() - started}
                | result.to_dict()
            )
            print(f"<!-- initial val loss {result.initial_val_loss:.4f}, params {result.num_params} -->", flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"argv": sys.argv, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
