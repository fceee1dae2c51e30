"""Why a restarted peer's first updates fail the norm check: its update norm against a peer that kept going.

Two peers train the built-in default run from a shared master (plain averaging, no network); at round
--restart the second is replaced by a fresh trainer of the same key, keeping (`--keep`) its optimizer
state, its data stream, or neither, as a restart from disk could. Prints, per round, both update norms
(the raw delta, before compression) and their ratio; one JSON line each with --json.

    python bench/restart_norms.py --keep nothing
    python bench/restart_norms.py --keep optimizer
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.peer.trainer import LocalTrainer  # noqa: E402
from potluck.protocol.config import RunConfig  # noqa: E402


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))


def main() -> None:
    """Run the two peers and print each round's norms from the round before the restart on."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", choices=["nothing", "optimizer", "data"], default="nothing")
    parser.add_argument("--restart", type=int, default=2, help="the round the second peer restarts at")
    parser.add_argument("--after", type=int, default=4, help="rounds to run after the restart")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = RunConfig()
    device = torch.device("cpu")
    peers = [LocalTrainer(cfg, public_key=bytes([i]) * 32, device=device) for i in range(2)]
    master = {n: t.detach().clone() for n, t in peers[0].model.named_parameters()}
    for r in range(args.restart + args.after):
        if r == args.restart:
            old, new = peers[1], LocalTrainer(cfg, public_key=bytes([1]) * 32, device=device)
            if args.keep == "optimizer":
                new.optimizer.load_state_dict(old.optimizer.state_dict())
            elif args.keep == "data":
                new.batches = old.batches
            peers[1] = new
        deltas = []
        for peer in peers:
            peer.start_round(master, round_index=r)
            peer.train(max_steps=cfg.local_steps)
            shot = peer.take_snapshot()
            deltas.append({n: shot.current[n] - shot.base[n] for n in shot.base})
        norms = [_norm(d) for d in deltas]
        if r >= args.restart - 1:
            row = {"keep": args.keep, "round": r, "kept_going": norms[0], "restarted": norms[1]}
            row["ratio"] = norms[1] / norms[0]
            print(json.dumps(row) if args.json else f"{args.keep} round {r}: {norms[0]:.3f} {norms[1]:.3f} "
                  f"ratio {row['ratio']:.2f}", flush=True)  # fmt: skip
        master = {n: master[n] + sum(d[n] for d in deltas) / len(deltas) for n in master}


if __name__ == "__main__":
    main()
