"""The harness's verdict and JSON: the issue's bars, a diverged undefended run counting as real harm."""

import json
import math
from pathlib import Path

import pytest

from potluck.lab.redteam import harness
from potluck.lab.redteam.harness import to_json, verdict
from potluck.lab.swarm import SwarmResult
from potluck.protocol.config import RunConfig


def _report(**changes: object) -> dict:
    base = {
        "attack": "noise",
        "tpr": 1.0,
        "fpr": 0.0,
        "final_val_loss": 3.15,
        "clean_final_val_loss": 3.14,
        "loss_vs_clean": 0.003,
        "undefended_final_val_loss": 4.3,
        "undefended_loss_vs_clean": 0.37,
        "undefended_diverged": False,
    }
    return base | changes


def test_every_bar_met() -> None:
    assert verdict(_report()) == {
        "honest_kept": True,
        "loss_within_5pct": True,
        "adversarial_caught": True,
        "attack_is_real": True,
    }


def test_each_bar_can_fail() -> None:
    assert not verdict(_report(fpr=0.06))["honest_kept"]
    assert not verdict(_report(loss_vs_clean=0.051))["loss_within_5pct"]
    assert not verdict(_report(tpr=0.94))["adversarial_caught"]
    assert not verdict(_report(undefended_loss_vs_clean=0.19))["attack_is_real"]


def test_filter_evading_attacks_are_judged_by_loss_not_by_rejections() -> None:
    assert "adversarial_caught" not in verdict(_report(attack="alie", tpr=0.5))


def test_a_diverged_undefended_run_is_real_harm_and_its_json_has_no_nan() -> None:
    report = _report(
        attack="bitflip", undefended_final_val_loss=math.nan, undefended_loss_vs_clean=None, undefended_diverged=True
    )

    assert verdict(report)["attack_is_real"]
    parsed = json.loads(to_json(report), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert parsed["undefended_final_val_loss"] is None and parsed["verdict"]["attack_is_real"] is True


def _swarm_result(adversaries: int) -> SwarmResult:
    peers = [
        {"name": f"p{i}", "fingerprint": f"pl-{i}", "adversary": i < adversaries, "accepted": 1, "rejected": 0}
        | {"uploads": [f"u{i}"]}
        for i in range(4)
    ]
    counted = [{"update": f"u{i}"} for i in range(adversaries, 4)]  # every honest upload, no adversarial one
    return SwarmResult(
        initial_val_loss=5.0,
        final_val_loss=3.0,
        rounds_completed=1,
        aggregator_multiaddrs=[],
        num_params=1,
        peers=peers,
        rounds=[{"accepted": counted}],
        wall_s=1.0,
    )


@pytest.mark.parametrize(
    ("attack", "swarms"), [("forged", ["attacked", "clean"]), ("scaled", ["attacked", "clean", "undefended"])]
)
def test_only_a_statistical_attack_gets_an_undefended_swarm(
    attack: str, swarms: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[tuple[str, RunConfig, int]] = []

    def fake_run_attacked(cfg: RunConfig, *, adversaries: int, shared: Path, **_: object) -> SwarmResult:
        ran.append((shared.name, cfg, adversaries))
        return _swarm_result(adversaries)

    monkeypatch.setattr(harness, "run_attacked", fake_run_attacked)

    report = harness.run_redteam(RunConfig(), attack=attack, peers=4, adversaries=1)

    assert [name for name, _, _ in ran] == swarms
    assert [bad for _, _, bad in ran] == [1, 0, 1][: len(swarms)]
    assert report["tpr"] == 1.0 and report["fpr"] == 0.0
    assert ("undefended_final_val_loss" in report) is (attack in harness.STATISTICAL)
    if len(ran) == 3:
        undefended_cfg = ran[2][1]
        assert undefended_cfg.aggregation.kind == "mean" and undefended_cfg.validation.held_out_margin is None
