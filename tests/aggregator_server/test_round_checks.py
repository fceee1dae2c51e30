"""Tests for potluck.aggregator_server.round_checks: outliers in norm and direction are caught, honest updates pass."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from potluck.aggregator_server import round_checks as round_checks_module
from potluck.aggregator_server.round_checks import (
    _leave_one_out_medians,
    direction_check,
    held_out_check,
    norm_check,
    round_checks,
    update_norms,
)
from potluck.aggregator_server.validation import Rejection

SPEC = {"wte": (64, 32), "h.0.w": (32, 32), "h.0.b": (32,)}  # 3104 parameters
MIN_COSINE = 0.1  # random noise has cosine ~N(0, 1/sqrt(3104)) ~ +-0.02 with any fixed direction


def _direction(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SPEC.items()}


COMMON = _direction(seed=1_000)


def _honest(seed: int) -> dict[str, torch.Tensor]:
    """The common direction plus noise of half its norm: cosine with the common direction ~0.9."""
    noise = _direction(seed)
    return {name: COMMON[name] + 0.5 * noise[name] for name in SPEC}


def _scaled(update: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {name: factor * t for name, t in update.items()}


def _norm(update: dict[str, torch.Tensor]) -> float:
    return update_norms([update])[0]


def _checks(results: list[Rejection | None]) -> list[str | None]:
    return [None if r is None else r.check for r in results]


def _noise_of_norm(seed: int, norm: float) -> dict[str, torch.Tensor]:
    noise = _direction(seed)
    return _scaled(noise, norm / _norm(noise))


def test_update_norms_are_the_l2_norm_over_all_tensors() -> None:
    # Prepare
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    # Execute
    norms = update_norms([update, _scaled(update, 2.0)])
    # Assert
    assert norms == [5.0, 10.0]


def test_an_honest_round_has_no_rejection() -> None:
    # Prepare
    updates = [_honest(seed) for seed in range(8)]
    # Execute
    results = round_checks(updates, min_cosine=MIN_COSINE)
    # Assert
    assert results == [None] * 8


def test_a_mixed_round_rejects_each_attacker_with_its_check() -> None:
    # Prepare: four honest updates, then x100, near-zero, sign-flipped, and noise of honest norm
    honest = [_honest(seed) for seed in range(4)]
    honest_norm = _norm(honest[0])
    updates = [
        *honest,
        _scaled(_honest(10), 100.0),
        _scaled(_honest(11), 1e-4),
        _scaled(_honest(12), -1.0),
        _noise_of_norm(13, honest_norm),
    ]
    # Execute
    results = round_checks(updates, min_cosine=MIN_COSINE)
    # Assert
    assert _checks(results) == [None, None, None, None, "norm", "norm", "direction", "direction"]
    assert "robust deviations above the round's median" in str(results[4])
    assert "carries ~nothing" in str(results[5])
    assert "cosine -0." in str(results[6])


def test_norm_check_alone_catches_a_huge_and_a_tiny_update() -> None:
    # Prepare
    norms = [1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 100.0, 0.001]
    # Execute
    results = norm_check(norms)
    # Assert
    assert _checks(results) == [None] * 6 + ["norm", "norm"]
    assert "norm 100 is" in str(results[6])


def test_norm_check_rejects_nothing_below_min_updates() -> None:
    # Prepare
    norms = [1.0, 1.0, 1_000.0]
    # Execute
    results = norm_check(norms, min_updates=4)
    # Assert
    assert results == [None, None, None]


def test_norm_check_with_zero_mad_tolerates_small_differences_and_catches_big_ones() -> None:
    # Prepare: most norms identical, so the MAD is 0 and the relative floor sets the scale
    norms = [2.0, 2.0, 2.0, 2.0, 2.0, 2.02, 1.9, 2.0 * 1.07]
    # Execute
    results = norm_check(norms)
    # Assert
    assert _checks(results) == [None] * 7 + ["norm"]
    assert norm_check([3.0] * 8) == [None] * 8


def test_norm_check_with_a_zero_median_rejects_nothing() -> None:
    assert norm_check([0.0, 0.0, 0.0, 0.0, 5.0]) == [None] * 5


def test_direction_check_catches_sign_flip_and_noise() -> None:
    # Prepare
    honest = [_honest(seed) for seed in range(6)]
    updates = [*honest, _scaled(_honest(20), -1.0), _noise_of_norm(21, _norm(honest[0]))]
    # Execute
    results = direction_check(updates, min_cosine=MIN_COSINE)
    # Assert
    assert _checks(results) == [None] * 6 + ["direction", "direction"]
    assert "with the median of the other 7 updates, below 0.1" in str(results[7])


def test_two_identical_sign_flipping_attackers_out_of_eight_are_still_caught() -> None:
    # Prepare: each attacker's reference includes the other attacker, the median stays honest
    attacker = _scaled(_honest(30), -1.0)
    updates = [_honest(seed) for seed in range(6)] + [attacker, {k: v.clone() for k, v in attacker.items()}]
    # Execute
    results = round_checks(updates, min_cosine=MIN_COSINE)
    # Assert
    assert _checks(results) == [None] * 6 + ["direction", "direction"]


def test_direction_check_rejects_nothing_below_min_updates() -> None:
    # Prepare
    updates = [_honest(0), _honest(1), _scaled(_honest(2), -1.0)]
    # Execute / Assert
    assert direction_check(updates, min_updates=4) == [None] * 3


def test_a_zero_update_has_no_direction_and_a_zero_reference_passes_everyone() -> None:
    # Prepare
    zero = {name: torch.zeros(shape) for name, shape in SPEC.items()}
    updates = [_honest(seed) for seed in range(5)] + [zero]
    # Execute / Assert: cosine 0 for the zero update, so min_cosine decides
    assert _checks(direction_check(updates, min_cosine=MIN_COSINE)) == [None] * 5 + ["direction"]
    assert direction_check(updates, min_cosine=0.0) == [None] * 6
    assert direction_check([zero] * 4 + [_honest(0)], min_cosine=MIN_COSINE) == [None] * 5


def test_norm_rejected_updates_leave_the_direction_reference() -> None:
    # Prepare: five honest updates and four huge sign-flipped ones; with them in it, the median of
    # an honest update's eight others averages a flipped and an honest value and points the wrong way
    honest = [_honest(seed) for seed in range(5)]
    huge_flipped = [_scaled(_honest(seed), -1_000.0) for seed in range(40, 44)]
    updates = honest + huge_flipped
    # Execute
    results = round_checks(updates, min_cosine=MIN_COSINE)
    without_exclusion = direction_check(updates, min_cosine=MIN_COSINE)
    # Assert
    assert _checks(results) == [None] * 5 + ["norm"] * 4
    assert _checks(without_exclusion)[:5] == ["direction"] * 5


@given(
    rows=st.integers(min_value=2, max_value=9),
    columns=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
    levels=st.integers(min_value=1, max_value=5),
)
def test_leave_one_out_median_equals_the_median_of_the_others(rows: int, columns: int, seed: int, levels: int) -> None:
    # Prepare: few distinct values, so ties are common; one update per column, as the check lays them out
    generator = torch.Generator().manual_seed(seed)
    stacked = torch.randint(0, levels, (rows, columns), generator=generator).float() * 0.5
    # Execute
    got = _leave_one_out_medians(stacked.T.contiguous())
    # Assert
    for i in range(rows):
        others = torch.cat([stacked[:i], stacked[i + 1 :]])
        torch.testing.assert_close(got[i], torch.quantile(others, 0.5, dim=0), rtol=0, atol=0)


def test_direction_check_is_the_same_in_blocks_as_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a round whose tensors span many blocks, with a reversed and a noise update
    updates = [_honest(seed) for seed in range(9)] + [_scaled(_honest(9), -1.0), _noise_of_norm(10, 40.0)]
    whole = direction_check(updates, min_cosine=MIN_COSINE)
    monkeypatch.setattr(round_checks_module, "BLOCK_ELEMENTS", 7 * len(updates))  # 7 coordinates per block
    # Execute
    blocked = direction_check(updates, min_cosine=MIN_COSINE)
    # Assert
    assert _checks(blocked) == [None] * 9 + ["direction", "direction"]
    assert blocked == whole


def test_checks_are_deterministic_and_leave_inputs_alone() -> None:
    # Prepare
    updates = [_honest(seed) for seed in range(7)] + [_scaled(_honest(7), -1.0)]
    copies = [{k: v.clone() for k, v in u.items()} for u in updates]
    # Execute
    first = round_checks(updates, min_cosine=MIN_COSINE)
    second = round_checks(updates, min_cosine=MIN_COSINE)
    # Assert
    assert first == second
    assert first[7] is not None and first[7].check == "direction"
    for update, copy in zip(updates, copies, strict=True):
        assert all(torch.equal(update[k], copy[k]) for k in update)


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "no updates"),
        ([{}], "no tensors"),
        ([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], "missing \\['a'\\], extra \\['b'\\]"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], "shape \\(3,\\)"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.int64)}], "decode updates to float32"),
    ],
)
def test_malformed_rounds_are_refused(updates: list[dict[str, torch.Tensor]], message: str) -> None:
    for check in (update_norms, direction_check, round_checks):
        with pytest.raises(ValueError, match=message):
            check(updates)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_z": 0.0}, "max_z"),
        ({"max_z": math.inf}, "max_z"),
        ({"min_ratio": 1.0}, "min_ratio"),
        ({"min_ratio": -0.1}, "min_ratio"),
        ({"min_updates": 2}, "min_updates"),
        ({"min_cosine": 1.5}, "min_cosine"),
        ({"min_cosine": math.nan}, "min_cosine"),
    ],
)
def test_bad_thresholds_are_refused(kwargs: dict[str, float], message: str) -> None:
    updates = [_honest(seed) for seed in range(4)]
    with pytest.raises(ValueError, match=message):
        round_checks(updates, **kwargs)


def test_bad_norms_are_refused() -> None:
    with pytest.raises(ValueError, match="no norms"):
        norm_check([])
    with pytest.raises(ValueError, match="finite and non-negative"):
        norm_check([1.0, math.nan, 1.0, 1.0])


def test_held_out_check_rejects_what_is_worse_than_the_median_by_more_than_the_margin_x_its_gain() -> None:
    # base 3.0, median update 2.8 (gain 0.2): margin 1 puts the limit at 3.0, margin 0.5 at 2.9
    losses = [2.75, 2.8, 2.8, 2.85, 2.95, 3.05]

    at_one = held_out_check(losses, base_loss=3.0, margin=1.0)
    at_half = held_out_check(losses, base_loss=3.0, margin=0.5)

    assert [r is not None for r in at_one] == [False, False, False, False, False, True]
    assert [r is not None for r in at_half] == [False, False, False, False, True, True]
    assert at_one[5] is not None and at_one[5].check == "held-out" and "3.0500" in at_one[5].detail


def test_held_out_check_judges_nothing_without_enough_updates_or_when_the_median_gains_nothing() -> None:
    assert held_out_check([2.0, 2.0, 9.0], base_loss=3.0, min_updates=4) == [None] * 3
    assert held_out_check([3.1, 3.2, 3.3, 9.0], base_loss=3.0) == [None] * 4


def test_held_out_check_rejects_a_non_finite_loss_and_refuses_bad_arguments() -> None:
    results = held_out_check([2.8, 2.8, float("nan"), 2.9, 2.7], base_loss=3.0)

    assert [r is not None for r in results] == [False, False, True, False, False]
    with pytest.raises(ValueError, match="margin"):
        held_out_check([2.8] * 4, base_loss=3.0, margin=0.0)
    with pytest.raises(ValueError, match="base_loss"):
        held_out_check([2.8] * 4, base_loss=float("inf"))


# A late round (about round 20 of the honest-rejection bench): the median update gains 0.004 nats, less
# than the spread of single-update losses on 2 held-out batches; 2.3353 is the honest update the rule
# without a noise floor rejected ("above 2.3283 (round median 2.3242, base 2.3283, margin 1)").
LATE_BASE = 2.3283
LATE_HONEST = [2.3168, 2.3205, 2.3226, 2.3238, 2.3246, 2.3270, 2.3301, 2.3353]


def test_held_out_noise_floor_keeps_honest_updates_whose_loss_is_within_the_rounds_noise() -> None:
    without_floor = held_out_check(LATE_HONEST, base_loss=LATE_BASE, margin=1.0, noise_z=0.0)
    with_floor = held_out_check(LATE_HONEST, base_loss=LATE_BASE, margin=1.0, noise_z=4.0)

    assert [r is not None for r in without_floor] == [False] * 6 + [True, True]
    assert with_floor == [None] * 8


def test_held_out_noise_floor_still_rejects_an_update_well_above_the_base() -> None:
    losses = [*LATE_HONEST[:7], 2.40]  # 0.07 nats worse than not training: 15 robust deviations from the median

    results = held_out_check(losses, base_loss=LATE_BASE, margin=1.0, noise_z=4.0)

    assert [r is not None for r in results] == [False] * 7 + [True]
    assert results[7] is not None and "2.4000" in results[7].detail and "noise" in results[7].detail


def test_held_out_noise_floor_still_rejects_label_flip_in_the_first_rounds() -> None:
    # round 0-1 of the red team's label-flip: two flipped updates at 5.454 and 5.46 against base 5.383, the
    # round's median 4.943; the honest six spread over 0.04 nats, as single updates do that early
    honest = [4.921, 4.932, 4.938, 4.941, 4.945, 4.958]
    losses = [*honest, 5.454, 5.460]

    results = held_out_check(losses, base_loss=5.383, margin=1.0, noise_z=4.0)

    assert [r is not None for r in results] == [False] * 6 + [True, True]


def test_held_out_noise_z_must_be_finite_and_non_negative() -> None:
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="noise_z"):
            held_out_check(LATE_HONEST, base_loss=LATE_BASE, noise_z=bad)
