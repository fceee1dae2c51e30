"""Where should an overlapped peer train from while its update is in flight? A deterministic sweep.

With overlap a peer keeps training after its round-r snapshot, before round r's aggregate arrives;
`stale` of the next round's inner steps happen in that window. This runs P peers one after another
in one process (no network, no timing noise) and compares, at equal rounds and tokens:

- `off`: no overlap; every round starts from the new master state.
- `own`: the stale steps continue from the peer's own snapshot and are kept on top of the new
  master state when it arrives (one-round-delayed outer step, Streaming DiLoCo's merge).
- `guess`: the stale steps start from the peer's guess of the next master state, the outer step
  applied to its own *sent* (compressed) update; the arrival corrects the guess.
- `scaled`: as `guess`, but the own update is first scaled by how much of it the last aggregate
  carried (the least-squares fit of the aggregate on the own update, last round's): the mean of P
  updates that agree only in part moves less far along any one of them than that one does.
- `halved`: as `guess`, but only half of the stale steps' progress is kept when the aggregate
  arrives (model = new state + (model - guess) / 2), a discount on stale work.
- `eager`: as `guess`, but the outer step is applied to 1/P of its own sent update plus (P-1)/P of
  the previous round's aggregate, the eager update of Kale et al. 2025 (others' latest known
  updates stand in for their missing ones).

Round 0 uploads at `--first-density`, later rounds at `--density`, as adaptive density does
(protocol/density.py): what a sparse round 0 leaves out stays in the peers' residuals.

Each arm also reports what the aggregator's held-out check (margin 1) would say of every update,
applied alone to the round's base: how many it would drop, and how far past the round's median each
one lands. The bench aggregates every update all the same, so the losses do not depend on the check.

    python bench/overlap_merge.py --stale 30 --stale 10 --out bench/results/overlap-merge
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from potluck.aggregator_server.round_checks import held_out_check
from potluck.protocol.codecs import make_codec
from potluck.protocol.codecs.aggregate import encode_aggregate
from potluck.protocol.config import RunConfig
from potluck.training.combine import weighted_mean
from potluck.training.data import BatchSampler, load_corpus, val_batches
from potluck.training.diloco import OuterOptimizer, inner_lr, inner_step, load_params, make_inner_optimizer, snapshot
from potluck.training.evaluate import evaluate
from potluck.training.models import build_model, model_config

MODES = ("off", "own", "guess", "scaled", "halved", "eager")


def projection(own: dict[str, torch.Tensor], aggregate: dict[str, torch.Tensor]) -> float:
    """<own, aggregate> / <own, own>: the scale of `own` that best predicts `aggregate` (0 for a zero `own`)."""
    dot = sum(float(torch.dot(own[k].reshape(-1).double(), aggregate[k].reshape(-1).double())) for k in own)
    norm = sum(float(own[k].double().pow(2).sum()) for k in own)
    return dot / norm if norm > 0 else 0.0


def run(
    cfg: RunConfig, *, mode: str, peers: int, stale: int, first_density: float, density: float
) -> tuple[list[float], int, list[float], list[float]]:
    """Held-out loss after each round of one arm, the updates the held-out check would drop, the mean scales,
    and each update's distance past the round's median in median gains (the check rejects past its margin, 1)."""
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg.model.size, block_size=cfg.model.block_size)
    corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, max_bytes=cfg.data.max_bytes)
    held_out = val_batches(corpus.val, batch_size=cfg.inner.batch_size, block_size=mcfg.block_size, num_batches=16)
    master_model = build_model(mcfg, seed=cfg.seed)
    master = snapshot(master_model)
    spec = {name: tuple(t.shape) for name, t in master.items()}
    outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
    workers = [build_model(mcfg, seed=cfg.seed) for _ in range(peers)]
    optimizers = [
        make_inner_optimizer(
            w, lr=cfg.inner.lr, betas=(cfg.inner.beta1, cfg.inner.beta2), weight_decay=cfg.inner.weight_decay
        )
        for w in workers
    ]
    samplers = [
        BatchSampler(corpus.train, batch_size=cfg.inner.batch_size, block_size=mcfg.block_size, shard=p,
                     num_shards=peers, seed=cfg.seed)
        for p in range(peers)
    ]  # fmt: skip
    steps = [0] * peers
    residuals: list[dict[str, torch.Tensor]] = [{} for _ in range(peers)]
    aggregator_residual: dict[str, torch.Tensor] = {}
    total = cfg.rounds * cfg.local_steps
    done_early = [0] * peers  # the next round's steps already taken while the last aggregate was in flight
    points: list[dict[str, torch.Tensor] | None] = [None] * peers  # where those steps started
    bases = [dict(master) for _ in range(peers)]
    for w in workers:
        load_params(w, master)

    def train(p: int, n: int) -> None:
        for _ in range(n):
            lr = inner_lr(min(steps[p], total - 1), total_steps=total, peak_lr=cfg.inner.lr,
                          warmup_steps=cfg.inner.warmup_steps, min_lr_ratio=cfg.inner.min_lr_ratio)  # fmt: skip
            inner_step(workers[p], optimizers[p], samplers[p].next_batch(), lr=lr, grad_clip=cfg.inner.grad_clip)
            steps[p] += 1

    def shift(p: int, target: dict[str, torch.Tensor], point: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in workers[p].named_parameters():
                param.add_(target[name] - point[name])

    curve = []
    drops = 0
    excess: list[float] = []
    scales_seen: list[float] = []
    scales = [1.0] * peers
    last_applied: dict[str, torch.Tensor] | None = None
    check_batches = held_out[: cfg.validation.held_out_batches]
    for r in range(cfg.rounds):
        codec = make_codec("dct-topk", {"density": first_density if r == 0 else density})
        down = make_codec("dct-topk", {"density": min(1.0, 4 * (first_density if r == 0 else density))})
        decoded = []
        for p in range(peers):
            train(p, cfg.local_steps - done_early[p])
            current = snapshot(workers[p])
            delta = {k: bases[p][k] - current[k] for k in current}
            payload = codec.encode(delta, residuals[p])
            sent = codec.decode(payload, spec)
            decoded.append(sent)
            done_early[p] = 0
            if mode == "off" or r + 1 == cfg.rounds:
                continue
            if mode in ("guess", "scaled", "halved", "eager"):
                estimate = sent if mode != "scaled" else {k: scales[p] * v for k, v in sent.items()}
                if mode == "eager" and last_applied is not None:
                    estimate = {k: sent[k] / peers + last_applied[k] * (peers - 1) / peers for k in sent}
                guess = outer.preview(master, estimate)
                shift(p, guess, current)
                points[p] = guess
            else:
                points[p] = current
            train(p, stale)
            done_early[p] = stale
        mean = weighted_mean(decoded, [1.0] * peers)
        aggregate = encode_aggregate(mean, codec=down, state=aggregator_residual)
        last_applied = down.decode(aggregate, spec)
        losses = []
        for sent in decoded:  # the aggregator's held-out check: the base with each update alone, outer lr
            load_params(master_model, {k: v - cfg.outer.lr * sent[k] for k, v in master.items()})
            losses.append(evaluate(master_model, check_batches, device=torch.device("cpu")))
        load_params(master_model, master)
        base_loss = evaluate(master_model, check_batches, device=torch.device("cpu"))
        drops += sum(r is not None for r in held_out_check(losses, base_loss=base_loss, margin=1.0))
        median = statistics.median(losses)
        if base_loss > median:  # how far past the median each update is, in median gains (the check's margin)
            excess.extend((loss - median) / (base_loss - median) for loss in losses)
        scales = [projection(sent, last_applied) for sent in decoded]
        scales_seen.append(statistics.mean(scales))
        outer.step(master, last_applied)
        for p in range(peers):
            if done_early[p] and mode == "halved":
                with torch.no_grad():
                    for name, param in workers[p].named_parameters():
                        param.copy_(master[name] + 0.5 * (param - points[p][name]))
            elif done_early[p]:
                shift(p, master, points[p])
            else:
                load_params(workers[p], master)
            bases[p] = {k: v.clone() for k, v in master.items()}
        load_params(master_model, master)
        curve.append(evaluate(master_model, held_out, device=torch.device("cpu")))
    return curve, drops, scales_seen, excess


def main() -> None:
    """Every mode at every staleness over the seeds; a table of final losses, JSON beside it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--stale", type=int, action="append", help="stale steps per round (repeatable)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-density", type=float, default=1 / 64)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--mode", action="append", choices=MODES, help="modes to run (repeatable; default all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    stales = args.stale or [args.local_steps, args.local_steps // 3]
    torch.set_num_threads(2)
    results = []
    for stale in stales:
        for mode in args.mode or MODES:
            if mode == "off" and stale != stales[0]:  # the same run at every staleness
                continue
            finals = []
            dropped = 0
            for seed in range(args.seeds):
                cfg = RunConfig(seed=seed, rounds=args.rounds, local_steps=args.local_steps)
                curve, drops, scales, excess = run(cfg, mode=mode, peers=args.peers, stale=stale,
                                           first_density=args.first_density, density=args.density)  # fmt: skip
                finals.append(curve[-1])
                dropped += drops
                results.append({"mode": mode, "stale": 0 if mode == "off" else stale, "seed": seed, "curve": curve,
                                "held_out_drops": drops, "scales": scales, "excess": excess})  # fmt: skip
                print(mode, stale, seed, " ".join(f"{x:.3f}" for x in curve), f"drops {drops}",
                      "scales", " ".join(f"{x:.2f}" for x in scales), file=sys.stderr, flush=True)  # fmt: skip
            stale_shown = 0 if mode == "off" else stale
            print(f"{mode:6s} stale {stale_shown:3d}: final {statistics.mean(finals):.4f}, held-out drops {dropped}")
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
