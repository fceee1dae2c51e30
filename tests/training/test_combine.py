"""Tests for potluck.training.combine: weighted mean, capped weights, trimmed mean, CenteredClip and the registry."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from potluck.training import combine
from potluck.training.combine import (
    AGGREGATOR_KINDS,
    aggregate,
    cap_weights,
    centered_clip,
    trimmed_mean,
    weighted_mean,
)

Update = dict[str, torch.Tensor]
SHAPES = {"wte": (5, 3), "h.0.bias": (4,), "scale": ()}


def _update(seed: int, scale: float = 0.01) -> Update:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _honest_and_attackers(n_honest: int = 6, n_bad: int = 2) -> tuple[list[Update], list[float]]:
    updates = [_update(i) for i in range(n_honest)] + [_update(100 + i, scale=1e6 * 0.01) for i in range(n_bad)]
    return updates, [1_000.0 + 100 * i for i in range(n_honest + n_bad)]


def _copy(update: Update) -> Update:
    return {name: t.clone() for name, t in update.items()}


def _same(a: Update, b: Update) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def _close(a: Update, b: Update, *, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=atol) for k in a)


def _distance(a: Update, b: Update) -> float:
    return math.sqrt(sum((a[k].double() - b[k].double()).square().sum().item() for k in a))


# cap_weights


def test_cap_weights_caps_a_hundredfold_claim_and_leaves_honest_claims_alone() -> None:
    # Prepare
    tokens = [1_000, 1_100, 900, 1_050, 100_000]

    # Execute
    weights = cap_weights(tokens, max_ratio_to_median=2.0)

    # Assert: median 1_050, so the liar gets 2_100
    assert weights == [1_000.0, 1_100.0, 900.0, 1_050.0, 2_100.0]


def test_cap_weights_applies_the_hard_cap_and_ignores_zero_claims_in_the_median() -> None:
    # Prepare: five zero-token sybils would make the median 0 if they counted
    tokens = [0, 0, 0, 0, 0, 1_000, 1_200, 50_000]

    # Execute
    weights = cap_weights(tokens, max_ratio_to_median=2.0, hard_cap=1_100)

    # Assert
    assert weights == [0.0] * 5 + [1_000.0, 1_100.0, 1_100.0]
    assert cap_weights([0, 0]) == [0.0, 0.0]


@given(st.lists(st.integers(min_value=1, max_value=10**9), min_size=1, max_size=20))
def test_cap_weights_never_raises_a_claim_and_bounds_it_by_the_median(tokens: list[int]) -> None:
    weights = cap_weights(tokens, max_ratio_to_median=3.0)
    median = sorted(tokens)[len(tokens) // 2]  # upper median, >= statistics.median
    assert all(w <= t and w <= 3.0 * median for w, t in zip(weights, tokens, strict=True))


@pytest.mark.parametrize(
    ("tokens", "kwargs"),
    [
        ([], {}),
        ([10, -1], {}),
        ([10], {"max_ratio_to_median": 0.5}),
        ([10], {"max_ratio_to_median": math.inf}),
        ([10], {"hard_cap": 0}),
    ],
)
def test_cap_weights_rejects_bad_input(tokens: list[int], kwargs: dict) -> None:
    with pytest.raises(ValueError):
        cap_weights(tokens, **kwargs)


# trimmed_mean


def test_trimmed_mean_with_nothing_to_trim_is_the_weighted_mean_exactly() -> None:
    # Prepare
    updates, weights = _honest_and_attackers(n_honest=5, n_bad=0)

    # Execute / Assert: trim 0, and trim too small to drop one of 5
    assert _same(trimmed_mean(updates, weights, trim_fraction=0.0), weighted_mean(updates, weights))
    assert _same(trimmed_mean(updates, weights, trim_fraction=0.19), weighted_mean(updates, weights))


def test_trimmed_mean_is_the_plain_median_mean_on_a_hand_made_case() -> None:
    # Prepare: one coordinate, values 1..5 with weights; trim one from each end keeps 2, 3, 4
    updates = [{"x": torch.tensor([float(v)])} for v in (5, 1, 3, 4, 2)]
    weights = [1.0, 1.0, 2.0, 1.0, 1.0]

    # Execute
    result = trimmed_mean(updates, weights, trim_fraction=0.2)

    # Assert: (2*1 + 3*2 + 4*1) / 4
    assert result["x"].dtype == torch.float32
    assert result["x"].item() == pytest.approx(3.0)


def test_trimmed_mean_and_centered_clip_survive_two_huge_outliers_the_mean_does_not() -> None:
    # Prepare
    updates, weights = _honest_and_attackers(n_honest=6, n_bad=2)
    honest = weighted_mean(updates[:6], weights[:6])
    honest_spread = max(_distance(u, honest) for u in updates[:6])

    # Execute
    mean = weighted_mean(updates, weights)
    trimmed = trimmed_mean(updates, weights, trim_fraction=0.25)
    clipped = centered_clip(updates, weights, tau=honest_spread, iterations=3)

    # Assert
    assert _distance(mean, honest) > 1e3
    assert _distance(trimmed, honest) < honest_spread
    assert _distance(clipped, honest) < honest_spread


@given(permutation=st.permutations(range(5)))
def test_trimmed_mean_breaks_ties_by_weight_so_order_does_not_matter(permutation: list[int]) -> None:
    # Prepare: two updates tie at 1.0 with different weights; which one is trimmed must not depend on order
    updates = [{"x": torch.tensor([v])} for v in (1.0, 1.0, 5.0, 5.0, 9.0)]
    weights = [1.0, 10.0, 1.0, 2.0, 1.0]

    # Execute
    result = trimmed_mean(updates, weights, trim_fraction=0.2)
    permuted = trimmed_mean([updates[i] for i in permutation], [weights[i] for i in permutation], trim_fraction=0.2)

    # Assert: bit for bit
    assert _same(result, permuted)


def test_trimmed_mean_stays_within_each_coordinates_range() -> None:
    updates, weights = _honest_and_attackers(n_honest=4, n_bad=3)
    result = trimmed_mean(updates, weights, trim_fraction=0.3)
    for name in SHAPES:
        stacked = torch.stack([u[name] for u in updates])
        assert torch.all(result[name] >= stacked.min(dim=0).values)
        assert torch.all(result[name] <= stacked.max(dim=0).values)


def test_trimmed_mean_slices_large_tensors_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    updates, weights = _honest_and_attackers(n_honest=5, n_bad=2)
    whole = trimmed_mean(updates, weights, trim_fraction=0.2)

    # Execute
    monkeypatch.setattr(combine, "_CHUNK_ELEMENTS", 4)
    sliced = trimmed_mean(updates, weights, trim_fraction=0.2)

    # Assert
    assert _same(whole, sliced)


def test_trimmed_mean_ignores_zero_weight_updates() -> None:
    # Prepare: the zero-weight outlier neither counts nor takes part
    updates = [{"x": torch.tensor([float(v)])} for v in (1, 2, 3, 1e9)]
    weights = [1.0, 1.0, 1.0, 0.0]

    # Execute / Assert: n = 3, trim 0.34 drops one from each end, keeping 2
    assert trimmed_mean(updates, weights, trim_fraction=0.34)["x"].item() == 2.0


# centered_clip


@given(
    start_scale=st.sampled_from([0.0, 0.01, 100.0]),
    start_seed=st.integers(min_value=0, max_value=1_000),
)
def test_centered_clip_with_a_huge_tau_is_the_weighted_mean_from_any_start(
    start_scale: float, start_seed: int
) -> None:
    # Prepare
    updates, weights = _honest_and_attackers(n_honest=5, n_bad=0)
    start = _update(start_seed, scale=start_scale)

    # Execute
    result = centered_clip(updates, weights, tau=1e30, iterations=1, start=start)

    # Assert
    assert _close(result, weighted_mean(updates, weights), atol=1e-5 * max(1.0, start_scale))


def test_centered_clip_moves_at_most_tau_times_the_weight_share_per_iteration() -> None:
    # Prepare: one coordinate; the start is the honest value, one outlier far away with half the weight
    updates = [{"x": torch.tensor([0.0])}, {"x": torch.tensor([1e6])}]

    # Execute
    result = centered_clip(updates, [1.0, 1.0], tau=2.0, iterations=1, start={"x": torch.tensor([0.0])})

    # Assert
    assert result["x"].item() == pytest.approx(1.0)


def test_centered_clip_clips_by_the_whole_update_norm_not_per_tensor() -> None:
    # Prepare: an update 3 along "a" and 4 along "b": norm 5, clipped to 1 as one vector
    updates = [{"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}]
    start = {"a": torch.tensor([0.0]), "b": torch.tensor([0.0])}

    # Execute
    result = centered_clip(updates, [1.0], tau=1.0, iterations=1, start=start)

    # Assert
    assert result["a"].item() == pytest.approx(0.6)
    assert result["b"].item() == pytest.approx(0.8)


def test_centered_clip_does_not_modify_its_start() -> None:
    updates, weights = _honest_and_attackers(n_honest=3, n_bad=1)
    start = _update(7)
    before = _copy(start)
    centered_clip(updates, weights, tau=0.01, start=start)
    assert _same(start, before)


# every rule


RULES = [
    ("mean", {}),
    ("trimmed-mean", {"trim_fraction": 0.25}),
    ("centered-clip", {"tau": 0.05, "iterations": 3}),
]


@pytest.mark.parametrize(("kind", "params"), RULES)
@given(permutation=st.permutations(range(8)))
def test_every_rule_is_invariant_under_permuting_the_updates(kind: str, params: dict, permutation: list[int]) -> None:
    # Prepare
    updates, weights = _honest_and_attackers(n_honest=6, n_bad=2)

    # Execute
    result = aggregate(kind, updates, weights, **params)
    permuted = aggregate(kind, [updates[i] for i in permutation], [weights[i] for i in permutation], **params)

    # Assert
    assert _close(result, permuted, atol=1e-5)


@pytest.mark.parametrize(("kind", "params"), RULES)
def test_every_rule_returns_identical_updates_unchanged(kind: str, params: dict) -> None:
    update = _update(3)
    result = aggregate(kind, [_copy(update) for _ in range(5)], [1.0, 2.0, 3.0, 4.0, 5.0], **params)
    assert _close(result, update)


@pytest.mark.parametrize(("kind", "params"), RULES)
def test_every_rule_is_deterministic_fp32_and_leaves_its_inputs_alone(kind: str, params: dict) -> None:
    # Prepare: fp64 inputs too, to see the output cast to fp32
    updates, weights = _honest_and_attackers(n_honest=5, n_bad=2)
    updates[0] = {name: t.double() for name, t in updates[0].items()}
    before = [_copy(u) for u in updates]
    weights_before = list(weights)

    # Execute
    first = aggregate(kind, updates, weights, **params)
    second = aggregate(kind, updates, weights, **params)

    # Assert
    assert _same(first, second)
    assert all(t.dtype == torch.float32 and t.shape == SHAPES[name] for name, t in first.items())
    assert all(_same(u, b) for u, b in zip(updates, before, strict=True))
    assert weights == weights_before


@pytest.mark.parametrize(("kind", "params"), RULES[1:])
def test_every_robust_rule_rejects_bad_updates_and_weights(kind: str, params: dict) -> None:
    good = [_update(0), _update(1)]
    renamed = [_update(0), {("x" if k == "wte" else k): t for k, t in _update(1).items()}]
    reshaped = [_update(0), {**_update(1), "wte": torch.zeros(3, 5)}]
    for updates, weights in [
        ([], []),
        (good, [1.0]),
        (good, [1.0, -1.0]),
        (good, [1.0, math.nan]),
        (good, [1.0, math.inf]),
        (good, [0.0, 0.0]),
        (renamed, [1.0, 1.0]),
        (reshaped, [1.0, 1.0]),
    ]:
        with pytest.raises(ValueError):
            aggregate(kind, updates, weights, **params)


@pytest.mark.parametrize("trim_fraction", [-0.1, 0.5, 0.7, math.nan])
def test_trimmed_mean_rejects_a_trim_fraction_outside_zero_to_half(trim_fraction: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean([_update(0)], [1.0], trim_fraction=trim_fraction)


@pytest.mark.parametrize(("tau", "iterations"), [(0.0, 3), (-1.0, 3), (math.nan, 3), (1.0, 0)])
def test_centered_clip_rejects_bad_tau_or_iterations(tau: float, iterations: int) -> None:
    with pytest.raises(ValueError):
        centered_clip([_update(0)], [1.0], tau=tau, iterations=iterations)


def test_centered_clip_rejects_a_start_of_another_shape() -> None:
    with pytest.raises(ValueError, match="start"):
        centered_clip([_update(0)], [1.0], tau=1.0, start={"wte": torch.zeros(5, 3)})


# aggregate


def test_aggregate_dispatches_to_each_rule() -> None:
    # Prepare
    updates, weights = _honest_and_attackers(n_honest=5, n_bad=2)

    # Execute / Assert
    assert AGGREGATOR_KINDS == ("mean", "trimmed-mean", "centered-clip")
    assert _same(aggregate("mean", updates, weights), weighted_mean(updates, weights))
    assert _same(
        aggregate("trimmed-mean", updates, weights, trim_fraction=0.3),
        trimmed_mean(updates, weights, trim_fraction=0.3),
    )
    assert _same(
        aggregate("centered-clip", updates, weights, tau=0.1, iterations=2),
        centered_clip(updates, weights, tau=0.1, iterations=2),
    )


def test_aggregate_names_the_known_rules_for_an_unknown_one() -> None:
    with pytest.raises(ValueError, match="'krum'.*mean, trimmed-mean, centered-clip"):
        aggregate("krum", [_update(0)], [1.0])  # type: ignore[arg-type]
