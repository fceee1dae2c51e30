"""Bit packing for codec payloads: fixed-width fields and two-stream Rice codes, pure numpy.

Sparse codecs send a few indices per chunk. Sorted within a chunk, consecutive indices differ by
small gaps, and a Rice code (Golomb with a power-of-two divisor ``2**r``) spends about
``log2(mean gap) + 1.5`` bits per gap instead of ``log2(chunk)`` for a fixed-width index.

The Rice code is split into two streams so that both directions are vectorized: the quotients
``gap >> r`` go to a *unary* stream (``q`` one-bits then a zero-bit per gap, padded with one-bits),
the remainders ``gap & (2**r - 1)`` to a fixed-width stream. Decoding finds the zero-bits (their
positions give every quotient at once) and unpacks the remainders; there is no bit-serial loop.

All bit orders are little-endian within a byte. Every encoding is canonical (padding bits are
fixed and streams have their minimal length), and the decoders reject anything else with
``ValueError``, so one set of values has exactly one byte string.
"""

from __future__ import annotations

import numpy as np

# Widths above 32 would not fit the uint64 arithmetic below with room to spare; codecs need <= 16.
MAX_WIDTH = 32


def pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers, each into ``width`` bits; returns ``ceil(len*width/8)`` bytes."""
    if not 0 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be in [0, {MAX_WIDTH}], got {width}")
    values = np.asarray(values, dtype=np.uint64).ravel()
    if width < MAX_WIDTH and values.size and int(values.max()) >> width:
        raise ValueError(f"a value does not fit in {width} bits")
    if width == 8:
        return values.astype(np.uint8)
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little")


def unpack_fixed(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of `pack_fixed`: ``count`` values as int64; ValueError unless ``data`` is canonical."""
    if not 0 <= width <= MAX_WIDTH or count < 0:
        raise ValueError(f"bad width {width} or count {count}")
    nbits = width * count
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != -(-nbits // 8):
        raise ValueError(f"a {width}-bit stream of {count} values must be {-(-nbits // 8)} bytes, got {data.size}")
    if width == 8:
        return data.astype(np.int64)
    bits = np.unpackbits(data, bitorder="little")
    if bits[nbits:].any():
        raise ValueError("padding bits of a fixed-width stream are not zero")
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    weights = np.left_shift(np.int64(1), np.arange(width, dtype=np.int64))
    return bits[:nbits].reshape(count, width).astype(np.int64) @ weights


def rice_cost_bits(gaps: np.ndarray, r: int) -> int:
    """Total bits of the two Rice streams for ``gaps`` at parameter ``r`` (before byte padding)."""
    gaps = np.asarray(gaps, dtype=np.int64)
    return int(gaps.size * (r + 1) + (gaps >> r).sum())


def best_rice_parameter(gaps: np.ndarray, max_r: int) -> int:
    """The ``r`` in ``[0, max_r]`` that makes the streams shortest (exact count, smallest r on ties).

    The textbook choice ``r ~ log2(mean gap)`` is usually right or one off; counting every
    candidate costs ``max_r + 1`` cheap passes over the gaps and is never wrong.
    """
    costs = [rice_cost_bits(gaps, r) for r in range(max_r + 1)]
    return int(np.argmin(costs))


def rice_encode(gaps: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Rice-code non-negative ``gaps`` with parameter ``r``; returns (unary bytes, remainder bytes)."""
    gaps = np.asarray(gaps, dtype=np.int64).ravel()
    if gaps.size and int(gaps.min()) < 0:
        raise ValueError("Rice codes need non-negative gaps")
    quotients = gaps >> r
    ends = np.cumsum(quotients + 1)  # one past each gap's zero-bit
    total = int(ends[-1]) if gaps.size else 0
    bits = np.ones(-(-total // 8) * 8, dtype=np.uint8)  # padding bits are ones: they cannot end a gap
    bits[ends - 1] = 0
    unary = np.packbits(bits, bitorder="little")
    remainders = pack_fixed(gaps & ((1 << r) - 1), r)
    return unary, remainders


def rice_decode(unary: np.ndarray, remainders: np.ndarray, *, r: int, count: int) -> np.ndarray:
    """Inverse of `rice_encode`: ``count`` gaps as int64; ValueError unless both streams are canonical.

    The caller bounds ``unary.size`` before calling: the unpacked stream takes 8 bytes per byte.
    """
    if unary.dtype != np.uint8 or unary.ndim != 1:
        raise ValueError("the unary stream must be a flat uint8 array")
    bits = np.unpackbits(unary, bitorder="little")
    zeros = np.flatnonzero(bits == 0)
    if zeros.size != count:
        raise ValueError(f"the unary stream holds {zeros.size} codes, expected {count}")
    used = int(zeros[-1]) + 1 if count else 0
    if bits.size - used >= 8:
        raise ValueError("the unary stream is longer than its codes")
    quotients = np.diff(zeros, prepend=-1) - 1
    return (quotients << r) | unpack_fixed(remainders, r, count)
