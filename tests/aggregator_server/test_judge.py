"""Judging a closed round with the run's settings: outliers dropped, weights capped, the chosen rule applied."""

import pytest
import torch

from potluck.aggregator_server.judge import judge_round
from potluck.protocol.config import RunConfig
from potluck.training.combine import aggregate, combine, weighted_mean

CFG = RunConfig()


def _round(n: int = 8, *, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n honest updates: one shared direction plus a little noise each."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(512, generator=generator)
    return [{"w": direction + 0.3 * torch.randn(512, generator=generator)} for _ in range(n)]


def test_an_honest_round_keeps_everyone_with_their_tokens() -> None:
    verdict = judge_round(_round(), [1000] * 8, cfg=CFG, token_cap=10_000)

    assert verdict.kept == tuple(range(8))
    assert verdict.weights == (1000.0,) * 8
    assert verdict.rejections == {}


def test_outliers_are_dropped_by_name_and_a_big_token_claim_is_capped() -> None:
    # Prepare: one update scaled x100, one sign-flipped, one claiming 100x the tokens
    updates = _round()
    updates[2] = {"w": updates[2]["w"] * 100}
    updates[5] = {"w": -updates[5]["w"]}
    tokens = [1000] * 8
    tokens[7] = 100_000
    # Execute
    verdict = judge_round(updates, tokens, cfg=CFG, token_cap=1_000_000)
    # Assert
    assert {i: r.check for i, r in verdict.rejections.items()} == {2: "norm", 5: "direction"}
    assert verdict.kept == (0, 1, 3, 4, 6, 7)
    assert verdict.weights[-1] == 2 * 1000  # max_weight_ratio 2 x the median claim
    assert verdict.weights[:-1] == (1000.0,) * 5


def test_the_hard_cap_is_what_one_peer_can_train_in_a_round() -> None:
    verdict = judge_round(_round(4), [5000] * 4, cfg=CFG, token_cap=3000)

    assert verdict.weights == (3000.0,) * 4


@pytest.mark.parametrize("kind", ["mean", "trimmed-mean", "centered-clip"])
def test_combine_applies_the_configured_rule(kind: str) -> None:
    updates, weights = _round(), [1.0] * 8
    cfg = CFG.with_overrides({"aggregation.kind": kind})

    combined = combine(updates, weights, spec=cfg.aggregation)

    if kind == "mean":
        expected = weighted_mean(updates, weights)
    elif kind == "trimmed-mean":
        expected = aggregate("trimmed-mean", updates, weights, trim_fraction=0.25)
    else:
        norms = sorted(float(u["w"].norm()) for u in updates)
        tau = (norms[3] + norms[4]) / 2  # clip_tau_ratio 1 x the median norm
        expected = aggregate("centered-clip", updates, weights, tau=tau, iterations=3)
    torch.testing.assert_close(combined["w"], expected["w"])


def test_centered_clip_resists_a_huge_update_the_mean_does_not() -> None:
    updates, weights = _round(), [1.0] * 8
    honest = weighted_mean(updates, weights)["w"]
    updates[0] = {"w": updates[0]["w"] * 1e6}

    clip = CFG.with_overrides({"aggregation.kind": "centered-clip"}).aggregation
    clipped = combine(updates, weights, spec=clip)["w"]
    mean = combine(updates, weights, spec=CFG.aggregation)["w"]

    assert float((clipped - honest).norm()) < 0.5 * float(honest.norm())
    assert float((mean - honest).norm()) > 1000 * float(honest.norm())


def test_with_no_weight_cap_claims_are_the_weights() -> None:
    cfg = CFG.with_overrides({"aggregation.max_weight_ratio": None})

    verdict = judge_round(_round(4), [1000, 1000, 1000, 100_000], cfg=cfg, token_cap=3000)

    assert verdict.weights == (1000.0, 1000.0, 1000.0, 100_000.0)


def _loss_of_distance_to(target: torch.Tensor, base: torch.Tensor):
    """A stand-in held-out loss: squared distance of (base - update) to a target model."""

    def loss(update: dict[str, torch.Tensor] | None) -> float:
        params = base if update is None else base - update["w"]
        return float((params - target).square().sum())

    return loss


def test_the_held_out_check_drops_an_update_that_makes_the_loss_worse_when_enabled() -> None:
    # Prepare: honest updates step from base towards the target; update 3 steps away from it
    generator = torch.Generator().manual_seed(1)
    base, target = torch.zeros(512), torch.randn(512, generator=generator)
    updates = [{"w": -(0.3 + 0.05 * i) * target + 0.02 * torch.randn(512, generator=generator)} for i in range(8)]
    updates[3] = {"w": 0.3 * target.roll(1)}  # same norm, wrong direction for this loss, cosine ~0 with the rest
    loss = _loss_of_distance_to(target, base)
    cfg_on = CFG.with_overrides({"validation.held_out_margin": 1.0, "validation.min_cosine": -1.0})
    # Execute
    enabled = judge_round(updates, [1000] * 8, cfg=cfg_on, token_cap=10_000, held_out_loss=loss)
    disabled = judge_round(
        updates,
        [1000] * 8,
        cfg=cfg_on.with_overrides({"validation.held_out_margin": None}),
        token_cap=10_000,
        held_out_loss=loss,
    )
    # Assert
    assert {i: r.check for i, r in enabled.rejections.items()} == {3: "held-out"}
    assert disabled.rejections == {}
    # the gains the scoring rule weighs credit by: measured for every update checked, none when off
    assert set(enabled.gains) == set(range(8)) and disabled.gains == {}
    assert enabled.gains[3] < 0 < min(g for i, g in enabled.gains.items() if i != 3)
