"""`potluck redteam`: a local swarm in which some peers misbehave, and how well the aggregator coped.

For one attack it runs, as real processes (the same launcher as `potluck swarm`):
1. the attacked run, defended (the run config's checks and aggregation);
2. the same run with every peer honest (the clean baseline);
3. for statistical attacks, the attacked run undefended: plain token-weighted mean (claims uncapped),
   statistical checks and bans off, to show the attack does harm when nothing stops it.

Rates are counted per upload, by digest: an adversarial upload is caught when the aggregator never
counted it in any round (or it is an honest peer's own upload replayed, which counts once);
an honest upload is a false positive when the aggregator never counted it.
"""

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from potluck.events import Event, RoundClosed
from potluck.lab.redteam.attacks import ATTACKS
from potluck.lab.swarm import SwarmDiverged, SwarmError, SwarmOptions, SwarmResult, run_swarm
from potluck.protocol.config import RunConfig

# Attacks that pass every per-update check and can only be caught (or absorbed) statistically.
STATISTICAL = frozenset({"scaled", "sign-flip", "noise", "zero", "wrong-base", "alie", "ipm", "label-flip", "bitflip"})
# Built to pass filters: judged by the final loss staying near the clean run's, not by rejections.
FILTER_EVADING = frozenset({"alie", "ipm", "label-flip"})
UNDEFENDED = {
    "aggregation.kind": "mean",
    "aggregation.max_weight_ratio": None,  # token claims are the weights, uncapped
    "validation.max_norm_z": 1e300,  # no norm is an outlier (a bit-flipped update is 1e31 deviations out)
    "validation.min_norm_ratio": 0.0,
    "validation.min_cosine": -1.0,
    "validation.held_out_margin": None,
    "validation.ban_after_rejections": 1_000_000,
}


def rates(result: SwarmResult) -> dict[str, Any]:
    """Uploads sent and never counted, adversarial and honest, with the true- and false-positive rates."""
    counted = {a["update"] for r in result.rounds for a in r["accepted"]}
    adversarial = [u for p in result.peers if p["adversary"] for u in p["uploads"]]
    honest = [u for p in result.peers if not p["adversary"] for u in p["uploads"]]
    # An adversarial upload that is byte for byte an honest one (a same-round replay) adds no weight: caught.
    caught = sum(u not in counted or u in set(honest) for u in adversarial)
    false_positives = sum(u not in counted for u in honest)
    return {
        "adversarial_updates": len(adversarial),
        "adversarial_rejected": caught,
        "honest_updates": len(honest),
        "honest_rejected": false_positives,
        "tpr": caught / len(adversarial) if adversarial else None,
        "fpr": false_positives / len(honest) if honest else None,
    }


def run_attacked(
    cfg: RunConfig,
    *,
    attack: str,
    peers: int,
    adversaries: int,
    shared: Path,
    strength: float = 1.0,
    timeout_s: float = 1800.0,
    on_event: Callable[[str, Event], None] = lambda child, event: None,
) -> SwarmResult:
    """One local swarm whose last `adversaries` peers run `attack`; `shared` is their colluders' directory."""
    shared.mkdir(parents=True, exist_ok=True)
    args = ("--attack", attack, "--shared", str(shared), "--colluders", str(adversaries), "--strength", str(strength))
    options = SwarmOptions(peers=peers, cfg=cfg, adversaries=adversaries, adversary_args=args, timeout_s=timeout_s)
    return run_swarm(options, on_event=on_event)


def run_redteam(
    cfg: RunConfig,
    *,
    attack: str,
    peers: int,
    adversaries: int,
    strength: float = 1.0,
    undefended: bool | None = None,
    timeout_s: float = 1800.0,
    on_event: Callable[[str, str, Event], None] = lambda run, child, event: None,
) -> dict[str, Any]:
    """Run the attacked, clean (and undefended) swarms and report the issue's keys (see the module docstring)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of: {', '.join(sorted(ATTACKS))}")
    if not 0 < adversaries < peers:
        raise ValueError(f"adversaries must be between 1 and peers - 1 ({peers - 1}), got {adversaries}")
    last_val_loss: dict[str, float] = {}  # per run, from the aggregator's round events
    with tempfile.TemporaryDirectory(prefix="potluck-redteam-") as tmp:

        def swarm(name: str, run_cfg: RunConfig, bad: int) -> SwarmResult:
            def follow(child: str, event: Event) -> None:
                if child == "aggregator" and isinstance(event, RoundClosed) and event.val_loss is not None:
                    last_val_loss[name] = event.val_loss
                on_event(name, child, event)

            return run_attacked(
                run_cfg,
                attack=attack,
                peers=peers,
                adversaries=bad,
                strength=strength,
                shared=Path(tmp) / name,
                timeout_s=timeout_s,
                on_event=follow,
            )

        attacked = swarm("attacked", cfg, adversaries)
        clean = swarm("clean", cfg, 0)
        report: dict[str, Any] = {
            "attack": attack,
            "peers": peers,
            "adversaries": adversaries,
            "rounds": attacked.rounds_completed,
            "aggregation": cfg.aggregation.kind,
            **rates(attacked),
            "final_val_loss": attacked.final_val_loss,
            "clean_final_val_loss": clean.final_val_loss,
            "initial_val_loss": attacked.initial_val_loss,
            "loss_vs_clean": attacked.final_val_loss / clean.final_val_loss - 1,
            "per_peer": [
                {k: p[k] for k in ("name", "fingerprint", "adversary", "accepted", "rejected")} for p in attacked.peers
            ],
        }
        if undefended if undefended is not None else attack in STATISTICAL:
            try:
                plain = swarm("undefended", cfg.with_overrides(UNDEFENDED, source="redteam"), adversaries)
            except SwarmError as e:
                # Blown up: a peer's training went non-finite, or the held-out loss did before the run failed.
                if not isinstance(e, SwarmDiverged) and math.isfinite(last_val_loss.get("undefended", 0.0)):
                    raise
                report |= {"undefended_final_val_loss": None, "undefended_loss_vs_clean": None}
                report |= {"undefended_diverged": True, "undefended_error": str(e)}
            else:
                report["undefended_final_val_loss"] = plain.final_val_loss
                report["undefended_loss_vs_clean"] = plain.final_val_loss / clean.final_val_loss - 1
                report["undefended_diverged"] = not math.isfinite(plain.final_val_loss)
                plain_rates = rates(plain)  # with the defences off, the attack's uploads go into the model
                report["undefended_adversarial_counted"] = (
                    plain_rates["adversarial_updates"] - plain_rates["adversarial_rejected"]
                )
        return report


def verdict(report: dict[str, Any]) -> dict[str, bool]:
    """Whether a report meets the issue's bars (>= 95% caught, <= 5% honest lost, loss within 5%, harm >= 20%)."""
    attack = report["attack"]
    checks = {
        "honest_kept": report["fpr"] is not None and report["fpr"] <= 0.05,
        "loss_within_5pct": report["loss_vs_clean"] <= 0.05,
    }
    if attack not in FILTER_EVADING:
        checks["adversarial_caught"] = report["tpr"] is not None and report["tpr"] >= 0.95
    if "undefended_loss_vs_clean" in report:
        harm = report["undefended_loss_vs_clean"]
        checks["attack_is_real"] = report["undefended_diverged"] or (harm is not None and harm >= 0.20)
    return checks


def to_json(report: dict[str, Any]) -> str:
    """The one `--json` object (a non-finite loss is written as null: JSON has no NaN)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in report.items()}
    return json.dumps(clean | {"verdict": verdict(report)})
