"""Which rejections strike a key: proofs at once, round-close statistics only when they repeat beyond noise."""

import random
from pathlib import Path

import pytest

from potluck.aggregator_server.strike_policy import (
    DESIGN_NOISE_RATE,
    DESIGN_RUN_ROUNDS,
    PROOF_CHECKS,
    STATISTICAL_CHECKS,
    TARGET_BAN_PROBABILITY,
    NoiseFilter,
    binomial_tail,
    noise_threshold,
    strike_probability,
)
from potluck.aggregator_server.validation import Rejection
from potluck.protocol.config import RunConfig
from potluck.protocol.identity import generate_identity
from tests.aggregator_server.test_keeper import PEER, _keeper

KEY, OTHER = generate_identity().public_key, generate_identity().public_key


@pytest.mark.parametrize("check", sorted(PROOF_CHECKS))
def test_a_check_that_proves_misbehaviour_strikes_at_once(check: str) -> None:
    noise = NoiseFilter(window=10, threshold=6)

    assert noise.strikes(KEY, round_index=0, check=check)


@pytest.mark.parametrize("check", sorted(STATISTICAL_CHECKS))
def test_a_statistical_rejection_strikes_only_from_the_thresholdth_in_the_window(check: str) -> None:
    noise = NoiseFilter(window=10, threshold=3)

    results = [noise.strikes(KEY, round_index=r, check=check) for r in (0, 4, 9, 10)]

    assert results == [False, False, True, True]
    assert not noise.strikes(OTHER, round_index=10, check=check)  # counted per key


def test_statistical_rejections_outside_the_window_are_forgotten() -> None:
    noise = NoiseFilter(window=10, threshold=3)

    results = [noise.strikes(KEY, round_index=r, check="norm") for r in (0, 8, 18, 26, 36)]

    assert results == [False, False, False, False, False]
    assert list(noise._history) == [KEY]  # and keys with nothing left in the window are dropped
    noise.strikes(OTHER, round_index=50, check="norm")
    assert list(noise._history) == [OTHER]


def test_two_statistical_rejections_in_one_round_count_once() -> None:
    noise = NoiseFilter(window=10, threshold=2)

    assert not noise.strikes(KEY, round_index=3, check="norm")
    assert not noise.strikes(KEY, round_index=3, check="held-out")


def test_the_binomial_tail_is_the_sum_of_its_terms() -> None:
    assert binomial_tail(3, 0.5, 2) == pytest.approx(0.5)
    assert binomial_tail(9, 0.1, 0) == 1.0 and binomial_tail(9, 0.1, 10) == 0.0


def test_the_design_threshold_is_the_smallest_that_keeps_an_honest_ban_under_the_target() -> None:
    window = RunConfig().validation.ban_window_rounds

    threshold = noise_threshold(DESIGN_NOISE_RATE, window=window)

    def bound(t: int) -> float:
        return strike_probability(DESIGN_NOISE_RATE, threshold=t, window=window, rounds=DESIGN_RUN_ROUNDS)

    assert bound(threshold) <= TARGET_BAN_PROBABILITY < bound(threshold - 1)
    assert NoiseFilter.for_run(RunConfig()).threshold == threshold == 6


def test_the_bound_holds_against_simulated_honest_keys() -> None:
    # Arrange: keys rejected by chance at 15% a round, a rate where strikes are common enough to count
    rate, window, threshold, rounds, keys = 0.15, 10, 4, 100, 2000
    rng = random.Random(7)
    # Act
    struck = 0
    for _ in range(keys):
        noise = NoiseFilter(window=window, threshold=threshold)
        struck += any(
            noise.strikes(KEY, round_index=r, check="direction") for r in range(rounds) if rng.random() < rate
        )
    # Assert: the union bound is above what happens, and not absurdly so
    bound = strike_probability(rate, threshold=threshold, window=window, rounds=rounds)
    assert bound / 20 < struck / keys <= bound


def test_the_keeper_drops_a_statistical_outlier_without_a_strike_until_it_repeats_then_bans_it(
    tmp_path: Path,
) -> None:
    # Arrange
    keeper = _keeper(tmp_path)
    keeper.members.add(PEER.public_key)  # only a member of the run is struck at all
    outlier = Rejection(check="norm", detail="norm 9.9 is 40 robust deviations above the round's median 1")
    threshold, ban_after = keeper.noise.threshold, keeper.reputation.ban_after
    # Act: the same key is a statistical outlier round after round, as a persistent attacker is
    struck, banned = [], []
    for r in range(threshold + ban_after - 1):
        keeper.current.index = r
        keeper.record_rejection(PEER.public_key, r, outlier)
        struck.append(len(keeper.reputation.strikes.get(PEER.public_key, [])))
        banned.append(keeper.reputation.is_banned(PEER.public_key))
    # Assert: no strike while noise explains it, then one a round until the ban
    assert struck == [0] * (threshold - 1) + list(range(1, ban_after + 1))
    assert banned == [False] * (threshold + ban_after - 2) + [True]
    keeper.ledger.close()
