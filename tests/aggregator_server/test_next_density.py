"""The aggregator's pick of the next round's upload density from its uploads' timings (aggregator_server/density)."""

from hypothesis import given
from hypothesis import strategies as st

from potluck.aggregator_server.next_density import TARGET_K, UploadTiming, fitting_density, next_density

LADDER = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def _timing(*, rate: float, compute_s: float, payload_bytes: int = 10_000) -> UploadTiming:
    """An upload of `payload_bytes` at `rate` bytes/s after `compute_s` of training."""
    upload_s = payload_bytes / rate
    return UploadTiming(payload_bytes=payload_bytes, upload_s=upload_s, cycle_s=compute_s + upload_s)


def test_a_fast_link_climbs_to_the_top_and_a_slow_one_drops_to_the_bottom() -> None:
    fast = _timing(rate=1e9, compute_s=3.0)
    slow = _timing(rate=1e3, compute_s=3.0)  # 10 kB already takes 10 s

    assert fitting_density(fast, current=1 / 64, ladder=LADDER, target_k=TARGET_K) == 1 / 2
    assert fitting_density(slow, current=1 / 64, ladder=LADDER, target_k=TARGET_K) == 1 / 64


def test_the_pick_is_the_densest_step_whose_upload_stays_within_a_ninth_of_the_compute() -> None:
    # 10 kB at 1/64 over 100 kB/s: 0.1 s; 9 s of compute allows 1 s, so 10x the bytes: 1/8 (8x), not 1/4 (16x)
    timing = _timing(rate=100_000, compute_s=9.0)

    assert fitting_density(timing, current=1 / 64, ladder=LADDER, target_k=0.9) == 1 / 8


def test_the_run_takes_the_lower_median_so_at_least_half_the_links_carry_it() -> None:
    fast, slow = _timing(rate=1e9, compute_s=3.0), _timing(rate=1e3, compute_s=3.0)

    assert next_density(1 / 64, [fast, fast, slow], ladder=LADDER) == 1 / 2
    assert next_density(1 / 64, [fast, slow, slow], ladder=LADDER) == 1 / 64
    assert next_density(1 / 64, [fast, slow], ladder=LADDER) == 1 / 64  # a tie goes to the thinner code


def test_nothing_changes_without_a_ladder_a_density_or_a_timing() -> None:
    fast = _timing(rate=1e9, compute_s=3.0)

    assert next_density(1 / 64, [fast], ladder=(1 / 64,)) == 1 / 64
    assert next_density(0.0, [fast], ladder=(0.0,)) == 0.0
    assert next_density(1 / 8, [], ladder=LADDER) == 1 / 8


@given(
    rates=st.lists(st.floats(min_value=1e2, max_value=1e10), min_size=1, max_size=9),
    compute_s=st.floats(min_value=0.0, max_value=1e4),
    current=st.sampled_from(LADDER),
)
def test_the_pick_is_on_the_ladder_and_never_thinner_for_faster_links(
    rates: list[float], compute_s: float, current: float
) -> None:
    timings = [_timing(rate=r, compute_s=compute_s) for r in rates]
    faster = [_timing(rate=r * 10, compute_s=compute_s) for r in rates]

    picked = next_density(current, timings, ladder=LADDER)

    assert picked in LADDER
    assert next_density(current, faster, ladder=LADDER) >= picked
