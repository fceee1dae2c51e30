"""Retries wait a jittered, doubling and capped time: peers that lost an aggregator together spread their retries."""

import random

import pytest

from potluck.protocol.backoff import backoff_s


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5, 10, 100, 10_000])
def test_each_wait_is_between_zero_and_the_capped_doubling(attempt: int) -> None:
    # Prepare
    ceiling = min(10.0, 0.5 * 2.0 ** min(attempt, 64))
    # Execute
    waits = [backoff_s(attempt, base_s=0.5, cap_s=10.0, rng=random.Random(seed)) for seed in range(200)]
    # Assert
    assert all(0.0 <= w <= ceiling for w in waits)
    assert max(waits) > ceiling / 2  # the draws cover the window, not just its start


def test_peers_with_different_random_states_wait_different_times() -> None:
    # Execute: a hundred peers draw their first, then their fourth retry's wait
    first = {backoff_s(0, base_s=0.5, cap_s=10.0, rng=random.Random(seed)) for seed in range(100)}
    fourth = {backoff_s(3, base_s=0.5, cap_s=10.0, rng=random.Random(seed)) for seed in range(100)}
    # Assert: no lock-step, from the first retry on
    assert len(first) == 100 and len(fourth) == 100


def test_the_same_random_state_draws_the_same_wait() -> None:
    assert backoff_s(4, base_s=1.0, cap_s=8.0, rng=random.Random(7)) == backoff_s(
        4, base_s=1.0, cap_s=8.0, rng=random.Random(7)
    )


def test_without_an_rng_each_call_draws_afresh() -> None:
    waits = {backoff_s(6, base_s=1.0, cap_s=30.0) for _ in range(20)}
    assert len(waits) > 1


@pytest.mark.parametrize(("attempt", "base_s", "cap_s"), [(-1, 0.5, 10.0), (0, -0.5, 10.0), (0, 0.5, -1.0)])
def test_a_negative_argument_is_refused(attempt: int, base_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        backoff_s(attempt, base_s=base_s, cap_s=cap_s)
