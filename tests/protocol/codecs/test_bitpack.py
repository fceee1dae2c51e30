"""Fixed-width packing and two-stream Rice codes: round trips, canonical form, cost."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from potluck.protocol.codecs import bitpack


@given(
    st.integers(0, 16).flatmap(
        lambda w: st.tuples(st.just(w), arrays(np.int64, st.integers(0, 200), elements=st.integers(0, (1 << w) - 1)))
    )
)
def test_fixed_width_round_trip(case: tuple[int, np.ndarray]) -> None:
    width, values = case
    packed = bitpack.pack_fixed(values, width)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(values.size * width / 8)
    assert np.array_equal(bitpack.unpack_fixed(packed, width, values.size), values)


def test_fixed_width_rejects_values_that_do_not_fit_and_non_canonical_streams() -> None:
    with pytest.raises(ValueError):
        bitpack.pack_fixed(np.array([4]), 2)
    packed = bitpack.pack_fixed(np.array([1, 2, 3]), 2)  # 6 bits: 2 padding bits
    with pytest.raises(ValueError, match="padding"):
        bitpack.unpack_fixed(packed | np.uint8(0x80), 2, 3)
    with pytest.raises(ValueError, match="bytes"):
        bitpack.unpack_fixed(np.concatenate([packed, packed]), 2, 3)


@given(arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 5000)), st.integers(0, 12))
def test_rice_round_trip(gaps: np.ndarray, r: int) -> None:
    unary, rem = bitpack.rice_encode(gaps, r)
    assert 8 * (unary.size + rem.size) - 14 <= bitpack.rice_cost_bits(gaps, r) <= 8 * (unary.size + rem.size)
    assert np.array_equal(bitpack.rice_decode(unary, rem, r=r, count=gaps.size), gaps)


def test_rice_rejects_wrong_counts_and_extra_bytes() -> None:
    gaps = np.array([3, 0, 7, 1])
    unary, rem = bitpack.rice_encode(gaps, 1)
    with pytest.raises(ValueError, match="codes"):
        bitpack.rice_decode(unary, rem, r=1, count=5)
    with pytest.raises(ValueError, match="longer"):
        bitpack.rice_decode(np.concatenate([unary, [0xFF]]).astype(np.uint8), rem, r=1, count=4)
    with pytest.raises(ValueError):
        bitpack.rice_decode(unary, rem[:-1], r=1, count=4)


def test_best_rice_parameter_is_the_cheapest_and_beats_fixed_width_for_sparse_positions() -> None:
    # Prepare: 4 sorted positions in each of 4000 chunks of 256, as top-k leaves them
    rng = np.random.default_rng(0)
    positions = np.sort(np.stack([rng.choice(256, 4, replace=False) for _ in range(4000)]), axis=1)
    gaps = (np.diff(positions, axis=1, prepend=-1) - 1).ravel()
    # Execute
    r = bitpack.best_rice_parameter(gaps, 8)
    # Assert: optimal among all r, and ~log2(256 / 4) + 1.5 bits per index instead of 8
    costs = [bitpack.rice_cost_bits(gaps, q) for q in range(9)]
    assert costs[r] == min(costs)
    bits_per_index = costs[r] / gaps.size
    assert bits_per_index < 8 and abs(bits_per_index - (math.log2(64) + 1.5)) < 0.5
