"""How often the aggregator's checks reject HONEST updates in long clean runs, and which check fires.

An in-process harness, cheap enough for a small CPU box: P peers train the run's model with the real
peer code (peer/trainer.py's LocalTrainer: inner AdamW steps, the codec with error feedback; with
overlap, the real RoundPacer's limit, `move_onto` the peer's guess of the next state and `rebase`), and
each round the real aggregator code judges the real updates: every update is signed and passes the
envelope checks (validation.py) and `decode_update`, then `judge_round` runs the round-close checks
(norm, direction, held-out, judge.py) exactly as closing.py does, and `close_round` (master.py) makes
the next state from the kept ones. No network, no ledger, no processes: what is left out (timing,
retries, late updates) decides nothing about whether an honest update passes the statistical checks.

Scenarios: `clean` (equal peers, no overlap), `overlap` (every peer trains ahead of its base up to its
RoundPacer limit, the worst case: the base always arrives after the limit is reached), `hetero` (time-
boxed peers of speeds 1..0.25 do proportionally fewer inner steps), `overlap-hetero` (both).

    nice -n 19 python bench/honest_rejections.py --rounds 100 --seeds 0,1 --max-minutes 40 \
        --out bench/results/honest-rejections.json

The JSON has, per scenario and seed, every rejection (round, peer, check, detail, steps, stale steps)
and per-update statistics; the summary printed at the end is what BENCHMARKS.md quotes. Beside it,
`*.losses.jsonl` has each round's raw held-out losses (the base's, and each peer's update applied
alone), so that any held-out rule can be judged offline on the same numbers:

    python bench/honest_rejections.py --replay bench/results/honest-rejections.losses.jsonl --noise-z 0,3
"""

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.aggregator_server.judge import judge_round  # noqa: E402
from potluck.aggregator_server.master import Contribution, MasterState, close_round, initial_master, token_cap  # noqa: E402
from potluck.aggregator_server.round_checks import (  # noqa: E402
    MAD_TO_SIGMA,
    MIN_RELATIVE_SCALE,
    direction_check,
    held_out_check,
    update_norms,
)
from potluck.aggregator_server.validation import RoundContext, check_envelope, decode_update  # noqa: E402
from potluck.peer.overlap import RoundPacer  # noqa: E402
from potluck.peer.trainer import LocalTrainer  # noqa: E402
from potluck.protocol import PROTOCOL_VERSION  # noqa: E402
from potluck.protocol.config import RunConfig  # noqa: E402
from potluck.protocol.density import round_codecs  # noqa: E402
from potluck.protocol.envelope import UpdateHeader, new_nonce, payload_digest, sign_update  # noqa: E402
from potluck.protocol.identity import Identity, generate_identity  # noqa: E402
from potluck.tasks.held_out import HeldOutLoss  # noqa: E402
from potluck.training.diloco import OuterOptimizer  # noqa: E402

SCENARIOS = ("clean", "overlap", "hetero", "overlap-hetero")
HETERO_SPEEDS = (1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25)  # repeated for more peers


@dataclass(kw_only=True)
class Peer:
    """One simulated volunteer: its key, its real trainer and pacer, and its overlap bookkeeping."""

    identity: Identity
    trainer: LocalTrainer
    pacer: RoundPacer
    steps: int  # inner steps its time box allows per round
    guess: dict[str, torch.Tensor] | None = None  # the point its overlapped steps started from
    stale: int = 0  # the open round's steps taken before its base arrived


@dataclass(kw_only=True)
class RunResult:
    """One scenario, one seed."""

    scenario: str
    seed: int
    rounds: int = 0
    updates: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)
    held_out_loss: list[float] = field(default_factory=list)
    margins: list[dict[str, float]] = field(default_factory=list)  # per round: how close the nearest update came
    # per round the held-out check judged: [round, base loss, [[peer, loss with its update applied alone], ...]],
    # every peer honest, so any held-out rule can be replayed offline on the same numbers (replay_held_out)
    held_out_losses: list[list[Any]] = field(default_factory=list)
    wall_s: float = 0.0


def _peers(cfg: RunConfig, scenario: str, count: int) -> list[Peer]:
    overlap = scenario.startswith("overlap")
    speeds = HETERO_SPEEDS if scenario.endswith("hetero") else (1.0,)
    peers = []
    for p in range(count):
        identity = generate_identity()
        trainer = LocalTrainer(cfg, public_key=identity.public_key, device=torch.device("cpu"))
        pacer = RoundPacer(trainer, cfg, overlap=overlap, overlap_limit=1.0)  # PeerOptions' default limit
        steps = max(1, round(cfg.local_steps * speeds[p % len(speeds)]))
        peers.append(Peer(identity=identity, trainer=trainer, pacer=pacer, steps=steps))
    return peers


def _sign(cfg: RunConfig, peer: Peer, master: MasterState, payload: bytes, tokens: int, steps: int, codec: str) -> Any:
    header = UpdateHeader(
        protocol_version=PROTOCOL_VERSION,
        run_id=cfg.run_name,
        config_hash=cfg.config_hash,
        round=master.round,
        base_version=master.version,
        peer_public_key=peer.identity.public_key,
        tokens=tokens,
        inner_steps=steps,
        codec=codec,
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=time.time(),
    )
    return sign_update(header, peer.identity)


def _train(peer: Peer, master: MasterState, round_index: int) -> Any:
    """The peer's round: its steps from the base (or on from its rebased overlap steps); the snapshot."""
    trainer = peer.trainer
    if peer.guess is None:  # no overlap, or round 0: from the master state itself
        trainer.start_round(master.params, round_index=round_index)
        peer.stale = 0
    else:  # the base arrived: move the steps taken from the guess onto it, as the peer loop does
        trainer.rebase(master.params, point=peer.guess)
    trainer.train(max_steps=peer.steps)
    return trainer.take_snapshot()


def _run_ahead(peer: Peer, master: MasterState, cfg: RunConfig, sent: dict[str, torch.Tensor], shot: Any) -> None:
    """Overlap: move onto the guess of the next state and train up to the pacer's limit before the base comes."""
    outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
    outer.load_state_dict(master.outer_state)
    peer.guess = outer.preview(master.params, sent)
    peer.trainer.move_onto(peer.guess, point=shot.current)
    peer.stale = min(peer.pacer.stale_limit(), peer.steps)
    peer.trainer.train(max_steps=peer.stale)


def run_one(cfg: RunConfig, scenario: str, *, peers: int, rounds: int, deadline: float) -> RunResult:
    """One long clean run; stops early (keeping what it measured) at the monotonic `deadline`."""
    started = time.monotonic()
    result = RunResult(scenario=scenario, seed=cfg.seed)
    group = _peers(cfg, scenario, peers)
    master = initial_master(cfg)
    scorer = HeldOutLoss(cfg, batches=cfg.validation.held_out_batches)
    scorer.load()
    aggregator = generate_identity()
    cap = token_cap(cfg)
    for r in range(rounds):
        if time.monotonic() > deadline:
            break
        upload, aggregate_codec = round_codecs(cfg, master.density)
        decoded, tokens, headers, stale = [], [], [], []
        for peer in group:
            peer.trainer.codec = upload
            stale_steps = peer.stale
            shot = _train(peer, master, r)
            work = peer.trainer.encode(shot, round_index=r)
            update = _sign(cfg, peer, master, work.payload, work.tokens, work.inner_steps, work.codec)
            ctx = RoundContext(
                run_id=cfg.run_name,
                config_hash=cfg.config_hash,
                round=master.round,
                version=master.version,
                codec=upload.name,
                max_update_bytes=cfg.max_update_bytes,
                accepted_digests={},
                now_s=time.time(),
                timestamp_window_s=cfg.validation.timestamp_window_s,
            )
            rejection = check_envelope(update, work.payload, ctx)
            values = None
            if rejection is None:
                values, rejection = decode_update(work.payload, codec=upload, spec=master.spec)
            if rejection is not None or values is None:  # never seen: an honest update is well formed
                check = "?" if rejection is None else rejection.check
                entry = {"round": r, "peer": group.index(peer), "check": check, "detail": str(rejection)}
                result.rejections.append({**entry, "at": "arrival"})
                continue
            decoded.append(values)
            tokens.append(work.tokens)
            headers.append((peer, update, work))
            stale.append(stale_steps)
            if peer.pacer.overlap:
                _run_ahead(peer, master, cfg, values, shot)

        scored: dict[int, float] = {}  # id(update) -> its loss; None's (the base's) under key 0

        def held_out(
            delta: dict[str, torch.Tensor] | None, base: MasterState = master, record: dict[int, float] = scored
        ) -> float:
            params = base.params if delta is None else {n: p - cfg.outer.lr * delta[n] for n, p in base.params.items()}
            loss = scorer(params, first=cfg.validation.held_out_batches)
            record[0 if delta is None else id(delta)] = loss
            return loss

        verdict = judge_round(decoded, tokens, cfg=cfg, token_cap=cap, held_out_loss=held_out)
        if 0 in scored:
            pairs = [
                [group.index(headers[i][0]), round(scored[id(values)], 6)]
                for i, values in enumerate(decoded)
                if id(values) in scored
            ]
            result.held_out_losses.append([r, round(scored[0], 6), pairs])
        for i, rejection in sorted(verdict.rejections.items()):
            peer, _, work = headers[i]
            result.rejections.append(
                {
                    "round": r,
                    "peer": group.index(peer),
                    "check": rejection.check,
                    "detail": rejection.detail,
                    "steps": work.inner_steps,
                    "stale_steps": stale[i],
                    "at": "close",
                }
            )
            peer.pacer.after_drop(r, stale_steps=stale[i], inner_steps=work.inner_steps)
        result.updates += len(group)
        result.margins.append(_margins(decoded, verdict.gains))
        contributions = [
            Contribution(
                public_key=headers[i][0].identity.public_key,
                decoded=decoded[i],
                tokens=int(w),
                update_digest=headers[i][1].header.digest(),
            )
            for i, w in zip(verdict.kept, verdict.weights, strict=True)
        ]
        master, _, _ = close_round(
            master, contributions, cfg=cfg, identity=aggregator, aggregate_codec=aggregate_codec
        )
        result.rounds += 1
        if r % 10 == 9 or r == rounds - 1:
            result.held_out_loss.append(held_out(None, master))
            print(
                f"  {scenario} seed {cfg.seed}: round {r + 1}/{rounds}, {len(result.rejections)} rejection(s), "
                f"held-out {result.held_out_loss[-1]:.3f}, {time.monotonic() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    result.wall_s = time.monotonic() - started
    return result


def _margins(decoded: list[dict[str, torch.Tensor]], gains: dict[int, float]) -> dict[str, float]:
    """How close the round's nearest honest update came to each round-close threshold (the real checks' numbers).

    max_z: the largest robust z-score of a norm (rejected above max_norm_z); min_ratio: the smallest norm over
    the median (rejected below min_norm_ratio); min_cosine: the smallest cosine with the median of the others
    (rejected below min_cosine; read from direction_check's own detail); min_gain_ratio: the smallest held-out
    gain over the median update's (with held_out_margin 1, rejected below 0).
    """
    norms = update_norms(decoded)
    median = statistics.median(norms)
    mad = statistics.median(abs(n - median) for n in norms)
    scale = max(MAD_TO_SIGMA * mad, MIN_RELATIVE_SCALE * median)
    cosines = [float(r.detail.split()[1]) for r in direction_check(decoded, min_cosine=1.0) if r is not None]
    values = sorted(gains.values())
    median_gain = statistics.median(values) if values else float("nan")
    return {
        "max_z": max((n - median) / scale for n in norms),
        "min_ratio": min(norms) / median,
        "min_cosine": min(cosines, default=float("nan")),
        "min_gain_ratio": values[0] / median_gain if values and median_gain > 0 else float("nan"),
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return {}
    return {
        q: finite[min(len(finite) - 1, int(f * len(finite)))]
        for q, f in (("min", 0), ("p01", 0.01), ("p50", 0.5), ("p99", 0.99))
    } | {"max": finite[-1]}


def summarize(results: list[RunResult]) -> dict[str, Any]:
    """Rates per scenario and overall, by check; the worst peer's rate (a key is judged alone)."""
    out: dict[str, Any] = {}
    for scenario in [*SCENARIOS, "all"]:
        chosen = [r for r in results if scenario in ("all", r.scenario)]
        updates = sum(r.updates for r in chosen)
        if not updates:
            continue
        by_check: dict[str, int] = {}
        per_peer: dict[tuple[str, int, int], int] = {}
        for run in chosen:
            for rej in run.rejections:
                by_check[rej["check"]] = by_check.get(rej["check"], 0) + 1
                who = (run.scenario, run.seed, rej["peer"])
                per_peer[who] = per_peer.get(who, 0) + 1
        rejected = sum(by_check.values())
        worst = max(per_peer.values(), default=0)
        worst_rounds = max((r.rounds for r in chosen), default=0)
        margins = {
            name: _quantiles([m[name] for run in chosen for m in run.margins])
            for name in ("max_z", "min_ratio", "min_cosine", "min_gain_ratio")
        }
        out[scenario] = {
            "runs": len(chosen),
            "rounds": sum(r.rounds for r in chosen),
            "updates": updates,
            "rejected": rejected,
            "rate": rejected / updates,
            # one-sided 95% upper bound on the rate (exact for 0 events: 3/n; else a Wilson bound)
            "rate_upper_95": _upper_95(rejected, updates),
            "by_check": by_check,
            "worst_peer_rejections": worst,
            "worst_peer_rate": worst / worst_rounds if worst_rounds else 0.0,
            "round_margins": margins,
        }
    return out


def _upper_95(k: int, n: int) -> float:
    """A one-sided 95% upper confidence bound for a binomial rate of k events in n trials (Wilson)."""
    if k == 0:
        return 1 - 0.05 ** (1 / n)
    z = 1.645
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def main() -> None:
    """Parse the flags, run every scenario and seed within the time bound, write the JSON and a summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--local-steps", type=int, default=10, help="inner steps per round (the config's is 30)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--max-minutes", type=float, default=40.0, help="stop (keeping what was measured) after this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared box: 1)")
    parser.add_argument("--out", type=Path, default=None, help="the report; the raw held-out losses go beside it")
    parser.add_argument("--replay", type=Path, nargs="+", default=None, help="*.losses.jsonl: judge them, run nothing")
    parser.add_argument("--noise-z", default="0,3", help="with --replay: the held-out noise_z values to judge with")
    args = parser.parse_args()
    if args.replay is not None:
        noise_zs = [float(z) for z in args.noise_z.split(",")]
        print(json.dumps(replay_held_out(args.replay, margin=1.0, noise_zs=noise_zs), indent=1))
        return
    torch.set_num_threads(args.threads)
    deadline = time.monotonic() + args.max_minutes * 60
    results: list[RunResult] = []
    for scenario in args.scenarios.split(","):
        if scenario not in SCENARIOS:
            raise SystemExit(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = RunConfig().with_overrides(
                {"rounds": args.rounds, "local_steps": args.local_steps, "seed": seed}, source="bench"
            )
            results.append(run_one(cfg, scenario, peers=args.peers, rounds=args.rounds, deadline=deadline))
            report = {
                "command": " ".join(sys.argv),
                "peers": args.peers,
                "local_steps": args.local_steps,
                "summary": summarize(results),
                "runs": [{k: v for k, v in r.__dict__.items() if k != "held_out_losses"} for r in results],
            }
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, separators=(",", ":")))
                write_losses(results, args.out.with_suffix(".losses.jsonl"))
    print(json.dumps(summarize(results), indent=1))


def write_losses(results: list[RunResult], path: Path) -> None:
    """The raw held-out losses, one round per line: what replay_held_out reads to judge another rule."""
    lines = [
        json.dumps({"scenario": r.scenario, "seed": r.seed, "round": rnd, "base": base, "losses": pairs})
        for r in results
        for rnd, base, pairs in r.held_out_losses
    ]
    path.write_text("".join(line + "\n" for line in lines))


def replay_held_out(paths: list[Path], *, margin: float, noise_zs: list[float]) -> dict[str, Any]:
    """Judge the recorded honest losses with held_out_check at each noise_z; rates by round range.

    Every recorded update is honest, so every rejection is a false one. Also reports the distribution of
    the honest losses' robust z, (loss - median) / (1.4826 MAD), which is what noise_z is measured in.
    """
    rounds = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    ranges = {"rounds 0-19": range(0, 20), "rounds 20 on": range(20, 10**9), "all": range(0, 10**9)}
    out: dict[str, Any] = {"rounds": len(rounds), "margin": margin}
    for noise_z in noise_zs:
        counts = {name: [0, 0] for name in ranges}
        for entry in rounds:
            losses = [loss for _, loss in entry["losses"]]
            rejected = sum(
                r is not None for r in held_out_check(losses, base_loss=entry["base"], margin=margin, noise_z=noise_z)
            )
            for name, span in ranges.items():
                if entry["round"] in span:
                    counts[name][0] += rejected
                    counts[name][1] += len(losses)
        out[f"noise_z={noise_z:g}"] = {
            name: {
                "rejected": k,
                "updates": n,
                "rate": k / n if n else 0.0,
                "rate_upper_95": _upper_95(k, n) if n else 1.0,
            }
            for name, (k, n) in counts.items()
        }
    robust_z: dict[str, list[float]] = {name: [] for name in ranges if name != "all"}
    for entry in rounds:
        losses = [loss for _, loss in entry["losses"]]
        median = statistics.median(losses)
        sigma = MAD_TO_SIGMA * statistics.median(abs(x - median) for x in losses)
        name = "rounds 0-19" if entry["round"] < 20 else "rounds 20 on"
        robust_z[name] += [(x - median) / sigma for x in losses if sigma > 0]
    out["robust_z"] = {
        name: _quantiles(values) | {"p95": sorted(values)[int(0.95 * len(values))] if values else math.nan}
        for name, values in robust_z.items()
    }
    return out


if __name__ == "__main__":
    main()
