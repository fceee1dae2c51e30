"""The loss gap at equal tokens: a tuned DDP baseline against uncompressed DiLoCo, the sparse path, potluck's default.

Every arm trains the same model on the same per-peer streams for the same number of tokens, with the same
inner AdamW and learning-rate schedule (potluck.planning.simulate: the peers run one after another in this
process, the aggregation is a function call, the bytes are the real signed messages). Arms:

- `ddp@LR`: data-parallel at the peers' global batch, one arm per peak learning rate of `--ddp-lrs`; the
  baseline is the one whose mean final loss over the seeds is lowest, so a gap is never measured against an
  untuned DDP;
- `diloco-nesterov`: DiLoCo uncompressed, outer Nesterov with the papers' lr 0.7 and momentum 0.9;
- `diloco-average`: uncompressed, plain parameter averaging (outer lr 1, no momentum);
- `sparseloco`: the sparse path as SparseLoCo runs it: top-k of 64 in chunks of 4,096 (1.6%), 2-bit
  values, error feedback (decay 0.95) in place of outer momentum, plain averaging of the sparse updates,
  the mean sent down uncompressed;
- `potluck-default`: the run config's own codec, aggregate codec and outer optimizer, at the codec's
  starting density (a live run raises it on fast links up to max_density);
- `potluck@D` (with `--densities`): the default at upload density D and the aggregate at the density a live
  round pairs with it (the config's ratio, 4x, at most 1);
- `potluck-average`: the default's codecs with plain averaging in place of its outer Nesterov, the control
  that tells the outer optimizer's share of the gap from the codec's.

`--arms` runs only the named DiLoCo arms, `--ddp-lrs none` no DDP arm, and `--tables FILE...` prints the tables
of earlier runs' JSON lines read together (same seeds and setup).

With `--dropout`, potluck's default also runs with half its peers killed at mid-run (`potluck-default+drop50`):
its loss when the undisturbed run ends (equal wall time: the same rounds, a quarter fewer tokens) and after
the rounds it takes the peers left to make up the tokens (equal tokens, at the schedule's floor lr).

With `--warm F` each arm also runs warm-started (`+warm`): the seed's DDP checkpoint after the first F of the
schedule (whole rounds), from which every arm trains the rest, as DiLoCo and INTELLECT-1 start. The DDP
arms keep their AdamW state across the checkpoint; DiLoCo's workers start their own. At that checkpoint it also
prints the gradient noise scale (in sequences), against which to judge the per-peer batch: a peer's batch
well below it sends mostly noise.

Seeds change the model's initialisation and every peer's data stream; they run interleaved (every arm of
seed 0, then of seed 1, ...). The table gives each arm's mean final held-out loss with a 95% t-interval, and
its gap to the baseline as the mean of the per-seed gaps (paired: same seed, same data) with its interval.

    python -m bench.loss_gap --model tiny --peers 4 --rounds 20 --local-steps 30 --seeds 0,1,2 \\
        --ddp-lrs 0.0015,0.003,0.006 --warm 0.1 --out bench/results/loss_gap_tiny.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from potluck.lab.intervals import t_half_width
from potluck.planning.simulate import Dropout, WarmStart, run_ddp, run_diloco, warm_start
from potluck.protocol.codecs import make_codec
from potluck.protocol.config import RunConfig
from potluck.protocol.density import aggregate_density
from potluck.tasks import run_task
from potluck.training.device import batch_to, pick_device
from potluck.training.diloco import load_params
from potluck.training.evaluate import evaluate

SPARSELOCO = {"chunk": 4096, "density": 1 / 64, "bits": 2, "ef_decay": 0.95}


@dataclass(frozen=True, slots=True)
class DilocoArm:
    """One DiLoCo arm: its outer optimizer and its two codecs (name, params)."""

    label: str
    outer: dict[str, Any]
    codec: tuple[str, dict[str, Any]]
    aggregate_codec: tuple[str, dict[str, Any]]


def diloco_arms(base: RunConfig, *, densities: Sequence[float] = ()) -> list[DilocoArm]:
    """The DiLoCo arms the module docstring lists, the default ones read from `base`, and the default at each of
    `densities` (`potluck@D`: what a live run sends once its adaptive density has climbed to upload density D)."""
    codec = (base.codec.name, dict(base.codec.params))
    aggregate_codec = (base.aggregate_codec.name, dict(base.aggregate_codec.params))
    denser = []
    for d in densities:  # the aggregate follows the upload as in a live round: the config's ratio, at most 1
        down = aggregate_density(base, d)
        down_params = aggregate_codec[1] | ({} if down is None else {"density": down})
        denser.append(
            DilocoArm(
                f"potluck@{d:g}",
                base.outer.model_dump(),
                (codec[0], codec[1] | {"density": d}),
                (aggregate_codec[0], down_params),
            )
        )
    return denser + [
        DilocoArm("diloco-nesterov", {"kind": "nesterov", "lr": 0.7, "momentum": 0.9}, ("none", {}), ("none", {})),
        DilocoArm("diloco-average", {"kind": "average"}, ("none", {}), ("none", {})),
        DilocoArm("sparseloco", {"kind": "average"}, ("topk", dict(SPARSELOCO)), ("none", {})),
        DilocoArm("potluck-default", base.outer.model_dump(), codec, aggregate_codec),
        DilocoArm("potluck-average", {"kind": "average"}, codec, aggregate_codec),
    ]


@dataclass(kw_only=True, slots=True)
class Summary:
    """One arm over the seeds: final losses, their mean and 95% interval, and the paired gap to the baseline."""

    arm: str
    losses: list[float]
    mean: float = math.nan
    half_width: float = math.nan
    gap_pct: float = math.nan
    gap_half_width: float = math.nan
    bytes_per_param_per_kstep: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


def noise_scale(model: torch.nn.Module, task: Any, *, seed: int, samples: int, device: torch.device) -> float:
    """The gradient noise scale B_simple = tr(Sigma) / |G|^2 in sequences (McCandlish et al. 2018), from `samples`
    one-sequence gradients: below it, a batch's gradient is mostly noise; well above it, more sequences add little.

    |G|^2 is the squared norm of the mean gradient less its expected noise, tr(Sigma) / samples.
    """
    grads = []
    stream = task.train_batches(seed=seed, batch_size=1)
    model.train()
    for _ in range(samples):
        model.zero_grad(set_to_none=True)
        task.loss(model, batch_to(next(stream), device)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double())
    stacked = torch.stack(grads)
    mean = stacked.mean(0)
    trace = float(((stacked - mean) ** 2).sum(1).mean()) * samples / (samples - 1)
    signal = float(mean.square().sum()) - trace / samples
    return trace / signal if signal > 0 else math.inf


def summarize(records: Iterable[dict[str, Any]], *, warm: bool) -> tuple[str, list[Summary]]:
    """The baseline DDP arm (lowest mean final loss) and every arm's summary, for the cold or the warm runs."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        if r["warm"] == warm:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    ddps = {arm: runs for arm, runs in by_arm.items() if arm.startswith("ddp@")}
    if not ddps:
        raise ValueError("no DDP arm to compare with")
    baseline = min(ddps, key=lambda arm: statistics.fmean(r["val_loss"] for r in ddps[arm].values()))
    summaries = []
    for arm, runs in by_arm.items():
        seeds = sorted(runs)
        losses = [runs[s]["val_loss"] for s in seeds]
        paired = [s for s in seeds if s in by_arm[baseline]]
        gaps = [(runs[s]["val_loss"] / by_arm[baseline][s]["val_loss"] - 1) * 100 for s in paired]
        summaries.append(
            Summary(
                arm=arm,
                losses=losses,
                mean=statistics.fmean(losses),
                half_width=t_half_width(losses),
                gap_pct=statistics.fmean(gaps) if gaps else math.nan,
                gap_half_width=t_half_width(gaps),
                bytes_per_param_per_kstep=statistics.fmean(runs[s]["up_bytes_per_param_per_kstep"] for s in seeds),
            )
        )
    return baseline, summaries


def markdown(baseline: str, summaries: list[Summary], *, title: str) -> str:
    """A markdown table of the summaries, the baseline first."""
    lines = [
        f"**{title}** (baseline {baseline}; interval: 95% t over seeds; gap: paired per seed)",
        "",
        "| arm | seeds | final val loss | gap vs tuned DDP | up B/param/kstep |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in sorted(summaries, key=lambda s: (s.arm != baseline, not s.arm.startswith("ddp@"), s.arm)):
        gap = "baseline" if s.arm == baseline else f"{s.gap_pct:+.2f}% ± {s.gap_half_width:.2f}"
        lines.append(
            f"| {s.arm} | {len(s.losses)} | {s.mean:.4f} ± {s.half_width:.4f} | {gap} | "
            f"{s.bytes_per_param_per_kstep:,.2f} |"
        )
    return "\n".join(lines)


def run_seed(
    base: RunConfig,
    *,
    seed: int,
    peers: int,
    ddp_lrs: Sequence[float],
    warm_fraction: float,
    eval_batches: int,
    device: torch.device,
    dropout: bool = False,
    noise_samples: int = 128,
    arms: Sequence[str] | None = None,
    densities: Sequence[float] = (),
) -> Iterable[dict[str, Any]]:
    """Every arm for one seed (cold, then warm-started), one record each as it finishes."""
    cfg = base.with_overrides({"seed": seed}, source="loss_gap")
    task = run_task(cfg)
    eval_set = [
        batch_to(b, device) for b in task.held_out_batches(batch_size=cfg.inner.batch_size, count=eval_batches)
    ]
    starts: list[WarmStart | None] = [None]
    if warm_fraction > 0:
        warm_rounds = max(1, round(cfg.rounds * warm_fraction))
        starts.append(warm_start(cfg, peers=peers, task=task, device=device, steps=warm_rounds * cfg.local_steps))
        checkpoint = task.build_model(seed=cfg.seed).to(device)
        load_params(checkpoint, starts[-1].params)  # type: ignore[union-attr]
        scale = noise_scale(checkpoint, task, seed=10_000 + seed, samples=noise_samples, device=device)
        print(f"seed {seed}: gradient noise scale at the warm start {scale:.0f} sequences", flush=True)
    initial = evaluate(task.build_model(seed=cfg.seed).to(device), eval_set, device=device, loss_of=task.loss)
    for warm in starts:
        for lr in ddp_lrs:
            ddp_cfg = cfg.with_overrides({"inner.lr": lr}, source="loss_gap")
            arm = run_ddp(ddp_cfg, peers=peers, task=task, eval_set=eval_set, device=device, warm=warm)
            yield _record(f"ddp@{lr:g}", arm, seed=seed, warm=warm, initial=initial)
        specs = diloco_arms(base, densities=densities)
        chosen: list[tuple[DilocoArm, Dropout | None]] = [
            (spec, None) for spec in specs if arms is None or spec.label in arms
        ]
        if dropout and warm is None:
            default = next(spec for spec in specs if spec.label == "potluck-default")
            chosen.append((default, half_leave(rounds=cfg.rounds, peers=peers)))
        for spec, leave in chosen:
            arm_cfg = cfg.with_overrides({f"outer.{k}": v for k, v in spec.outer.items()}, source="loss_gap")
            arm = run_diloco(
                arm_cfg,
                label=spec.label,
                peers=peers,
                codec=make_codec(spec.codec[0], spec.codec[1]),
                aggregate_codec=make_codec(spec.aggregate_codec[0], spec.aggregate_codec[1]),
                task=task,
                eval_set=eval_set,
                device=device,
                warm=warm,
                dropout=leave,
            )
            label = spec.label if leave is None else f"{spec.label}+drop50"
            planned = cfg.rounds - (
                0 if warm is None else warm.steps // cfg.local_steps
            )  # rounds this arm ran to plan
            at_plan = {"val_loss_equal_time": round(arm.val_loss_per_round[planned - 1], 5)}
            yield _record(label, arm, seed=seed, warm=warm, initial=initial) | at_plan


def half_leave(*, rounds: int, peers: int) -> Dropout:
    """Half the peers (rounded down) leave at mid-run; the rest go on until the run's planned tokens are in."""
    left, at = peers - peers // 2, rounds // 2
    lost = (peers - left) * (rounds - at)  # peer-rounds
    return Dropout(at_round=at, peers_left=left, extra_rounds=-(-lost // left))


def dropout_lines(records: Iterable[dict[str, Any]]) -> str:
    """The dropout figure: the disturbed run against the undisturbed one, per seed, at equal wall time and tokens."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        if not r["warm"]:
            runs.setdefault(r["arm"], {})[r["seed"]] = r
    calm, hit = runs.get("potluck-default", {}), runs.get("potluck-default+drop50", {})
    seeds = sorted(set(calm) & set(hit))
    if not seeds:
        return ""
    lines = ["**half the peers killed at mid-run** (potluck's default; paired per seed, 95% t-interval)", ""]
    for what, key in (("equal wall time", "val_loss_equal_time"), ("equal tokens", "val_loss")):
        gaps = [(hit[s][key] / calm[s]["val_loss"] - 1) * 100 for s in seeds]
        lines.append(
            f"- at {what}: {statistics.fmean(hit[s][key] for s in seeds):.4f} against "
            f"{statistics.fmean(calm[s]['val_loss'] for s in seeds):.4f} undisturbed, "
            f"{statistics.fmean(gaps):+.2f}% ± {t_half_width(gaps):.2f}"
        )
    return "\n".join(lines)


def _record(arm: str, result: Any, *, seed: int, warm: WarmStart | None, initial: float) -> dict[str, Any]:
    return {
        "arm": arm,
        "seed": seed,
        "warm": warm is not None,
        "warm_steps": 0 if warm is None else warm.steps,
        "initial_val_loss": round(initial, 5),
        "val_loss": round(result.val_loss, 5),
        "val_loss_per_round": [round(v, 4) for v in result.val_loss_per_round],
        "up_bytes_per_param_per_kstep": round(result.upload_bytes_per_param_per_kstep, 4),
        "down_bytes_per_param_per_round": round(result.download_bytes_per_param_per_round, 4),
        "wall_s": round(result.wall_s, 1),
    }


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """Run every arm for every seed, print one line per run and the tables; --out keeps one JSON line per run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="built-in model size")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=30, help="H, inner steps per round")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per peer per inner step")
    parser.add_argument("--lr", type=float, default=None, help="DiLoCo's peak inner lr (default: the config's)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="default: the config's, or a tenth of a run shorter"
    )
    parser.add_argument("--ddp-lrs", default=None, help="comma-separated DDP peak lrs (default: lr x 0.5, 1, 2)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--warm", type=float, default=0.0, help="also warm-start from DDP at this fraction (0.1)")
    parser.add_argument("--dropout", action="store_true", help="also kill half of potluck-default's peers mid-run")
    parser.add_argument("--noise-samples", type=int, default=128, help="one-sequence gradients for the noise scale")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per run here")
    parser.add_argument("--arms", default=None, help="comma-separated DiLoCo arms to run (default: all)")
    parser.add_argument(
        "--densities", default="", help="also run potluck's default at these upload densities (potluck@D arms)"
    )
    parser.add_argument(
        "--tables", nargs="+", type=Path, default=None, help="only print the tables of these JSON-lines files"
    )
    args = parser.parse_args(argv)
    if args.tables:
        records = [json.loads(line) for path in args.tables for line in path.read_text().splitlines() if line]
        print_tables(records, warm=any(r["warm"] for r in records), dropout=any("+drop" in r["arm"] for r in records))
        return

    steps = args.rounds * args.local_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else min(RunConfig().inner.warmup_steps, steps // 10)
    inner = {"batch_size": args.batch_size, "warmup_steps": warmup} | ({"lr": args.lr} if args.lr else {})
    base = RunConfig.model_validate(
        {"model": {"size": args.model}, "inner": inner, "local_steps": args.local_steps, "rounds": args.rounds}
    )
    if args.ddp_lrs == "none":  # DDP's runs are in another file: --tables reads them together
        ddp_lrs: list[float] = []
    else:
        ddp_lrs = _floats(args.ddp_lrs) if args.ddp_lrs else [base.inner.lr * f for f in (0.5, 1.0, 2.0)]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    device = pick_device(args.device)
    print(
        f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}; model {args.model}, {args.peers} peers x {args.batch_size} sequences, "
        f"{args.rounds} rounds x H={args.local_steps}, seeds {seeds}, DDP lrs {ddp_lrs}",
        flush=True,
    )
    records = []
    for seed in seeds:
        for record in run_seed(
            base,
            seed=seed,
            peers=args.peers,
            ddp_lrs=ddp_lrs,
            warm_fraction=args.warm,
            eval_batches=args.eval_batches,
            device=device,
            dropout=args.dropout,
            noise_samples=args.noise_samples,
            arms=None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()],
            densities=_floats(args.densities) if args.densities else (),
        ):
            records.append(record)
            print(
                f"seed {seed} {'warm' if record['warm'] else 'cold'} {record['arm']}: "
                f"val loss {record['val_loss']:.4f} ({record['wall_s']:.0f} s)",
                flush=True,
            )
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(json.dumps(record | {"model": args.model, "peers": args.peers}) + "\n")
    if ddp_lrs:
        print_tables(records, warm=args.warm > 0, dropout=args.dropout)


def print_tables(records: list[dict[str, Any]], *, warm: bool, dropout: bool) -> None:
    """The from-scratch table, the warm-started one with `warm`, and the dropout lines with `dropout`."""
    for started_warm in (False, True) if warm else (False,):
        baseline, summaries = summarize(records, warm=started_warm)
        print()
        print(markdown(baseline, summaries, title="warm-started" if started_warm else "from scratch"))
    if dropout:
        print()
        print(dropout_lines(records))


if __name__ == "__main__":
    main()
