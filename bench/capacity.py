"""The aggregator capacity model, fitted to the load runs' measured rounds, and what it says for large runs.

Reads bench/load.py's results (bench/results/load-*.json). A measured round at N identities on an aggregator
that owns P parameters gives:

- wall seconds per identity, round_s / N, at the largest N of each model and shard count (there the round
  waits on the aggregator, not on the identities' links);
- the aggregator's core-seconds per identity (its CPU share over the round x round_s / N);
- its peak RSS, whose slope over N at one P is the memory each identity costs.

Fitted by least squares through those points, with the held-out check (one aggregator) and without it (a shard's
aggregator, which holds part of the model and cannot run it; this line shares the first's intercept, the fixed
work per identity):

    wall(P) = a + b P        seconds of a two-core aggregator per identity per round
    mem(P)  = c + d P        MB per identity, held until the round closes

Then a model of `--params` parameters, `--volunteers` identities and rounds of `--round-s` seconds on two-core
aggregators with `--memory-gb` each needs S shards, the fewest with V wall(P/S) <= R and V mem(P/S) <= M; the
volunteers' links must carry an upload of P x (bytes per parameter at the run's density) within the round.

    python -m bench.capacity --params 1e9 --volunteers 1000,10000 --round-s 1000 --memory-gb 16,64
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MAX_SHARDS = 1_000_000


@dataclass(frozen=True, slots=True)
class Point:
    """One measured load run, summed over its measured rounds."""

    model: str
    shards: int
    params: int  # what the aggregator owns (its shard's)
    identities: int
    held_out: bool
    density: float
    upload_bytes: float  # per identity per round
    wall_s: float  # per identity: round_s / N, the rounds' median
    core_s: float  # per identity: the aggregator's CPU seconds over the round / N, the rounds' median
    rss_mb: float  # the rounds' peak


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _upload_bytes(every: list[dict[str, Any]], measured: list[dict[str, Any]]) -> float:
    """Bytes one identity uploads a round: over all rounds where the density never changed (results written before
    bench/load.py counted the workers' bytes attribute some of a round's uploads to the round before), else the
    measured rounds' median."""
    if len({r["density"] for r in every}) == 1:
        return sum(r["upload_bytes"] for r in every) / len(every)
    return _median([r["upload_bytes"] for r in measured])


def load_point(path: Path) -> Point:
    """A load result file's measured rounds as one point (ValueError when it has none)."""
    result = json.loads(path.read_text())
    rounds = [r for r in result["rounds"] if not r["warmup"]]
    if not rounds:
        raise ValueError(f"{path}: no measured round")
    n = result["identities"]
    shards = result.get("shards", 1)
    return Point(
        model=result["model"],
        shards=shards,
        params=result["num_params"],
        identities=n,
        held_out=shards == 1,
        density=_median([r["density"] for r in rounds]),
        upload_bytes=_upload_bytes(result["rounds"], rounds),
        wall_s=_median([r["round_s"] / n for r in rounds]),
        core_s=_median([(r["cpu"] or 0.0) * r["round_s"] / n for r in rounds]),
        rss_mb=max(r["rss_mb"] or 0.0 for r in rounds),
    )


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x; the slope alone through the origin's mean for one point."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


@dataclass(frozen=True, slots=True)
class Model:
    """The fitted lines: wall seconds and MB per identity per round, as functions of the parameters owned."""

    wall: dict[bool, tuple[float, float]]  # held_out -> (a, b)
    memory: tuple[float, float]  # (c, d): MB per identity
    base: tuple[float, float]  # (e, f): an aggregator's RSS with no identity, MB, = e + f P

    def wall_s(self, params: float, *, held_out: bool) -> float:
        """Two-core aggregator seconds per identity per round."""
        a, b = self.wall[held_out]
        return a + b * params

    def memory_mb(self, params: float) -> float:
        """MB per identity, held until the round closes."""
        c, d = self.memory
        return c + d * params

    def base_mb(self, params: float) -> float:
        """An aggregator's RSS before any identity: the model, its optimizer state, the served state."""
        e, f = self.base
        return e + f * params


def fit(points: list[Point]) -> Model:
    """The capacity model through `points` (see the module docstring)."""
    largest: dict[tuple[str, int], Point] = {}
    for p in points:
        key = (p.model, p.shards)
        if key not in largest or p.identities > largest[key].identities:
            largest[key] = p
    with_check = [p for p in largest.values() if p.held_out]
    without = [p for p in largest.values() if not p.held_out]
    if not with_check or not without:
        raise ValueError("the fit needs load results with the held-out check (1 shard) and without (2 or more)")
    a, b = fit_line([p.params for p in with_check], [p.wall_s for p in with_check])
    # The fixed per-identity work (signature, decode, fsyncs, ledger row, receipts, streams) is the same with the
    # check or without, and the check's own cost goes to 0 with the model: the line without it shares the
    # intercept, and its slope is fitted through the shards' points (a free intercept goes negative on them).
    slope = sum(p.params * (p.wall_s - a) for p in without) / sum(p.params**2 for p in without)
    wall = {True: (a, b), False: (a, slope)}
    slopes: list[tuple[float, float]] = []  # (params, MB per identity)
    bases: list[tuple[int, float]] = []
    for key in largest:
        at = sorted((p for p in points if (p.model, p.shards) == key), key=lambda p: p.identities)
        if len(at) >= 2:
            intercept, slope = fit_line([p.identities for p in at], [p.rss_mb for p in at])
            slopes.append((at[0].params, slope))
            bases.append((at[0].params, intercept))
    if not slopes:
        raise ValueError("memory per identity needs two identity counts of one model")
    memory = fit_line([x for x, _ in slopes], [y for _, y in slopes])
    base = fit_line([x for x, _ in bases], [y for _, y in bases])
    return Model(wall=wall, memory=memory, base=base)


def shards_needed(model: Model, *, params: float, volunteers: int, round_s: float, memory_gb: float) -> dict[str, Any]:
    """The fewest shards (two-core aggregators) whose CPU and memory hold `volunteers` in a round, and which binds."""

    def fits(s: int) -> tuple[bool, bool]:
        owned = params / s
        held_out = s == 1
        cpu_ok = volunteers * model.wall_s(owned, held_out=held_out) <= round_s
        mem_ok = model.base_mb(owned) + volunteers * model.memory_mb(owned) <= memory_gb * 1024
        return cpu_ok, mem_ok

    cpu_floor = volunteers * model.wall[False][0]  # the per-identity cost no shard count removes
    if cpu_floor > round_s:
        return {"shards": None, "binds": f"CPU: {cpu_floor:.0f} s of fixed per-identity work exceeds the round"}
    mem_floor = model.base[0] + volunteers * model.memory[0]
    if mem_floor > memory_gb * 1024:
        return {"shards": None, "binds": f"memory: {mem_floor / 1024:.1f} GB of fixed per-identity state"}
    s = next(k for k in range(1, MAX_SHARDS) if all(fits(k)))
    cpu_only = next(k for k in range(1, s + 1) if fits(k)[0])
    mem_only = next(k for k in range(1, s + 1) if fits(k)[1])
    owned = params / s
    return {
        "shards": s,
        "binds": "memory" if mem_only >= cpu_only else "CPU",
        "shards_for_cpu": cpu_only,
        "shards_for_memory": mem_only,
        "params_per_shard": round(owned),
        "aggregator_s_per_round": round(volunteers * model.wall_s(owned, held_out=s == 1), 1),
        "aggregator_gb": round((model.base_mb(owned) + volunteers * model.memory_mb(owned)) / 1024, 1),
    }


def main() -> None:
    """Fit the model to the result files, print the points, the lines and the answers."""
    p = argparse.ArgumentParser(
        prog="python -m bench.capacity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", nargs="*", type=Path, help="load result files [default: bench/results/load-*.json]")
    p.add_argument("--params", type=float, default=1e9, help="the model's parameters")
    p.add_argument("--volunteers", default="1000,10000", help="identities, comma-separated")
    p.add_argument("--round-s", type=float, default=1000.0, help="a round's length (H inner steps x step time)")
    p.add_argument("--memory-gb", default="16,64", help="memory per aggregator, comma-separated")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args()
    files = args.results or sorted(RESULTS.glob("load-*.json"))
    points = [load_point(f) for f in files]
    model = fit(points)
    answers = [
        {"volunteers": v, "memory_gb": m}
        | shards_needed(model, params=args.params, volunteers=v, round_s=args.round_s, memory_gb=m)
        for v in (int(x) for x in args.volunteers.split(","))
        for m in (float(x) for x in args.memory_gb.split(","))
    ]
    if args.json:
        out = {"points": [p.__dict__ for p in points], "wall": model.wall, "memory": model.memory, "base": model.base}
        out["answers"] = answers
        print(json.dumps(out))
        return
    print(
        "| model | shards | params owned | identities | density | upload B | s/identity | core-s/identity | RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pt in sorted(points, key=lambda q: (q.params, q.identities)):
        print(
            f"| {pt.model} | {pt.shards} | {pt.params:,} | {pt.identities:,} | {pt.density:g} "
            f"| {pt.upload_bytes:,.0f} | {pt.wall_s:.4f} | {pt.core_s:.4f} | {pt.rss_mb:,.0f} |"
        )
    for held_out, (a, b) in model.wall.items():
        print(
            f"wall per identity, held-out check {'on' if held_out else 'off'}: "
            f"{a:.4f} s + {b * 1e6:.4f} s per M params"
        )
    c, d = model.memory
    e, f = model.base
    print(f"memory per identity: {c:.3f} MB + {d * 1e6:.3f} MB per M params; base {e:.0f} MB + {f * 1e6:.1f} MB per M")
    for answer in answers:
        print(json.dumps(answer))


if __name__ == "__main__":
    main()
