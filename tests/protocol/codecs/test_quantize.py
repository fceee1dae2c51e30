"""Value quantizers, bf16 scales and the DCT: error bounds and exactness."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from potluck.protocol.codecs import quantize, topk

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
rows_of_values = st.integers(1, 8).flatmap(
    lambda k: arrays(np.float32, st.tuples(st.integers(1, 20), st.just(k)), elements=finite)
)


@given(arrays(np.float32, st.integers(0, 50), elements=st.floats(0, 2.0**100, width=32)))
def test_bf16_rounding(x: np.ndarray) -> None:
    nearest = quantize.bf16_values(quantize.bf16_bits(x))
    up = quantize.bf16_values(quantize.bf16_bits(x, round_up=True))
    subnormal_step = 2.0**-133  # bf16 keeps 7 mantissa bits below float32's smallest normal, 2**-126
    assert np.all(np.abs(nearest - x) <= x * 2.0**-8 + subnormal_step)
    assert np.all(up >= x) and np.all(up <= x * (1 + 2.0**-7) + subnormal_step)
    assert quantize.valid_scale_bits(quantize.bf16_bits(x))


def test_scale_validation_rejects_negative_nan_inf_and_huge() -> None:
    for bits in (0x8001, 0x7FC0, 0x7F80, 0x7C00, 0xFF80):
        assert not quantize.valid_scale_bits(np.array([bits], dtype=np.uint16))
    assert quantize.valid_scale_bits(np.array([0, 0x3F80, quantize.MAX_SCALE_BITS], dtype=np.uint16))


@given(rows_of_values)
def test_two_bit_is_never_worse_than_zeros_per_row(values: np.ndarray) -> None:
    codes, scales, rho = quantize.quantize_2bit(values)
    restored = quantize.dequantize_2bit(codes, scales, rho)
    error = ((restored.astype(np.float64) - values) ** 2).sum(axis=1)
    energy = (values.astype(np.float64) ** 2).sum(axis=1)
    assert np.all(error <= energy * (1 + 1e-6))
    assert codes.max(initial=0) < 4 and 1 <= rho <= 16


def test_two_bit_error_on_gaussian_top_values_is_small() -> None:
    # Prepare: the 4 largest of 256 Gaussian coefficients per chunk, as dct-topk keeps them
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 256)).astype(np.float32)
    kept = np.take_along_axis(x, np.argsort(-np.abs(x), axis=1)[:, :4], axis=1)
    # Execute
    restored = quantize.dequantize_2bit(*quantize.quantize_2bit(kept))
    # Assert: the figure documented in quantize's docstring (<= 1% of the kept energy)
    assert ((restored - kept) ** 2).sum() / (kept**2).sum() < 0.01


@given(rows_of_values, st.sampled_from([4, 8]))
def test_uniform_error_is_at_most_half_a_step(values: np.ndarray, bits: int) -> None:
    codes, scales = quantize.quantize_uniform(values, bits)
    restored = quantize.dequantize_uniform(codes, scales, bits)
    step = np.abs(values).max(axis=1) * (1 + 2.0**-7) / quantize.levels(bits)
    assert np.all(np.abs(restored - values) <= step[:, None] / 2 * (1 + 1e-5) + 1e-30)


def test_dct_matrix_is_orthonormal_and_sparse_inverse_matches_dense() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    d = topk.dct_matrix(64).astype(np.float64)
    positions = np.sort(np.stack([rng.choice(64, 5, replace=False) for _ in range(30)]), axis=1)
    values = rng.standard_normal((30, 5)).astype(np.float32)
    # Execute
    sparse = topk.inverse_dct_sparse(positions, values, 64)
    dense = np.zeros((30, 64))
    np.put_along_axis(dense, positions, values, axis=1)
    # Assert
    assert np.allclose(d @ d.T, np.eye(64), atol=1e-6)
    assert np.allclose(sparse, dense @ d, atol=1e-5)
