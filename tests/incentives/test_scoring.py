"""The credit rule: rejected earns nothing, claims are capped three ways, quality weighs what is left."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from potluck.incentives.scoring import ScoringRule, capped_claim, credit, quality_weight

ROUND = [4096] * 7


def test_a_rejected_update_earns_nothing_whatever_it_claims() -> None:
    assert credit(4096, accepted=False, round_claims=ROUND, history=[], token_cap=4096) == 0.0


def test_an_honest_claim_is_credited_in_full() -> None:
    assert credit(4096, accepted=True, round_claims=ROUND, history=[4096] * 5, token_cap=4096) == 4096


def test_claims_are_capped_by_the_config_the_round_median_and_the_peers_own_history() -> None:
    # Prepare: a config that would allow 1M tokens, so the other caps show
    big = 1_000_000
    # Execute / Assert
    assert capped_claim(409_600, round_claims=[*ROUND, 409_600], history=[], token_cap=4096) == 4096
    assert capped_claim(409_600, round_claims=[*ROUND, 409_600], history=[], token_cap=big) == 2 * 4096
    assert capped_claim(8192, round_claims=[8192] * 8, history=[1000, 1000, 1000], token_cap=big) == 2000


def test_a_short_history_does_not_cap_a_newcomer() -> None:
    assert capped_claim(8192, round_claims=[8192] * 8, history=[1000, 1000], token_cap=10**6) == 8192


def test_quality_weighs_the_capped_tokens_and_is_clamped() -> None:
    assert quality_weight(0.2, median_gain=0.1) == 2.0
    assert quality_weight(0.5, median_gain=0.1) == 2.0  # clamped at max_quality
    assert quality_weight(-0.1, median_gain=0.1) == 0.0
    assert quality_weight(float("nan"), median_gain=0.1) == 0.0
    assert quality_weight(0.05, median_gain=None) == 1.0  # not measured
    assert quality_weight(0.05, median_gain=0.0) == 1.0  # no yardstick
    assert credit(4096, accepted=True, round_claims=ROUND, history=[], token_cap=4096, gain=0.05, median_gain=0.1) == (
        2048
    )


def test_bad_inputs_and_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        capped_claim(-1, round_claims=ROUND, history=[], token_cap=4096)
    with pytest.raises(ValueError, match="token_cap"):
        capped_claim(1, round_claims=ROUND, history=[], token_cap=0)
    with pytest.raises(ValueError, match="max_ratio"):
        ScoringRule(max_ratio=0.5)
    with pytest.raises(ValueError, match="min_history"):
        ScoringRule(min_history=0)


@given(
    claimed=st.integers(0, 10**9),
    others=st.lists(st.integers(0, 10**9), min_size=1, max_size=16),
    history=st.lists(st.integers(0, 10**9), max_size=8),
    cap=st.integers(1, 10**9),
)
def test_credit_never_exceeds_the_claim_or_the_cap(
    claimed: int, others: list[int], history: list[int], cap: int
) -> None:
    got = capped_claim(claimed, round_claims=[*others, claimed], history=history, token_cap=cap)

    assert 0 <= got <= min(claimed, cap)
    assert math.isfinite(
        credit(claimed, accepted=True, round_claims=[*others, claimed], history=history, token_cap=cap)
    )
