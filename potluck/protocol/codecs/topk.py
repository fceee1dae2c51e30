"""Sparse codecs: chunked top-k (``topk``) and its DCT-domain version (``dct-topk``, DeMo/SparseLoCo).

The flat pseudo-gradient is cut into chunks of ``chunk`` elements (tail zero-padded). ``dct-topk``
maps each chunk through the orthonormal DCT-II first (pseudo-gradients concentrate energy in few
coefficients, DeMo arXiv 2411.19870); ``topk`` uses the raw values, to measure what the DCT buys.
Per chunk the ``k = max(1, round(chunk * density))`` largest-magnitude entries are kept, their
values quantized to ``bits`` bits with one bf16 scale per chunk (see `quantize`), their sorted
positions Rice-coded as within-chunk gaps (see `bitpack`). Defaults: chunk 256, density 1/64
(k = 4, SparseLoCo's 1.56%), 2 bits. Error feedback sends later what a round drops; ``ef_decay``
(default 0.9) forgets a tenth of the unsent residual each round, so stale directions from early
training stop crowding out fresh ones (0.9 beat 1.0 and 0.7, docs/experiments/simulate-sweeps.md).

Body arrays, for ``n_chunks`` chunks and ``n = n_chunks * k`` kept entries:

    scales     uint16[n_chunks]           bf16 bit patterns, finite, in [0, 2**120]
    codes      uint8[ceil(n * bits / 8)]  value codes, bit-packed
    rho        uint8[1]                   2-bit only: lower magnitude level rho = j/16, j in [1, 16]
    rice_r     uint8[1]                   Rice parameter r in [0, log2(chunk)]
    idx_unary  uint8[...]                 Rice quotients, unary (data-dependent length, bounded)
    idx_rem    uint8[ceil(n * r / 8)]     Rice remainders, r bits each

Size at the defaults, per 256-element chunk: 16 bits of scale + 4 x 2 bits of value + 4 Rice codes
of ~7.1 bits each (measured on random data; at most 31 bits for all 4: with r = 6, 4 x 7 bits plus
quotients summing to <= 252 >> 6 = 3) = ~53 bits, i.e. ~0.026 bytes per parameter before framing.
Fixed-width 8-bit indices would make it ~56 bits.

Decoding is bit-reproducible across machines: the inverse transform is a fixed-order sum of k
scaled rows of one DCT matrix built from a 4*chunk-entry cosine table, in numpy elementwise ops
(no BLAS, no fused multiply-add), so every peer that decodes the same payload gets the same bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from potluck.protocol.codecs import bitpack, quantize
from potluck.protocol.codecs.base import (
    Codec,
    CodecError,
    choice_param,
    float_param,
    int_param,
    take_array,
    take_bounded,
)

_ROWS_PER_BLOCK = 2048  # inverse-DCT rows per step: 2048 x 256 fp32 = 2 MiB, cache-sized temporaries


@functools.lru_cache(maxsize=8)
def dct_matrix(chunk: int) -> np.ndarray:
    """The orthonormal DCT-II matrix D (float32, read-only): ``coeffs = D @ x``, ``x = D.T @ coeffs``.

    ``D[f, t] = s_f * cos(pi * (2t + 1) * f / (2 * chunk))``, ``s_0 = sqrt(1/chunk)``, else
    ``sqrt(2/chunk)``. The angle is reduced to an integer mod ``4 * chunk`` before the cosine, so the
    matrix depends on ``4 * chunk`` libm calls only, and stays the same on every machine.
    """
    t = np.arange(chunk, dtype=np.int64)
    angle = np.outer(t, 2 * t + 1) % (4 * chunk)
    table = np.cos(np.pi * np.arange(4 * chunk) / (2 * chunk))
    norm = np.full(chunk, math.sqrt(2.0 / chunk))
    norm[0] = math.sqrt(1.0 / chunk)
    matrix = (table[angle] * norm[:, None]).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=8)
def _dct_matrix_torch(chunk: int, device: torch.device) -> torch.Tensor:
    """`dct_matrix` as a tensor on ``device`` (cached: the encoder multiplies by it every call)."""
    return torch.tensor(dct_matrix(chunk), device=device)


def select_topk(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` largest-magnitude entries: (sorted positions int64, their values)."""
    if k >= rows.shape[1]:
        positions = torch.arange(rows.shape[1], device=rows.device).expand(rows.shape[0], -1)
    else:
        positions = torch.topk(rows.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
    return positions, rows.gather(1, positions)


def encode_positions(positions: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
    """Rice-code sorted per-row positions as within-row gaps (``first``, then ``next - prev - 1``)."""
    gaps = (np.diff(positions, axis=1, prepend=-1) - 1).ravel()
    r = bitpack.best_rice_parameter(gaps, int(math.log2(chunk)))
    unary, remainders = bitpack.rice_encode(gaps, r)
    return {"rice_r": np.array([r], dtype=np.uint8), "idx_unary": unary, "idx_rem": remainders}


def decode_positions(arrays: Mapping[str, np.ndarray], *, rows: int, k: int, chunk: int) -> np.ndarray:
    """Inverse of `encode_positions`: ``(rows, k)`` strictly increasing positions in ``[0, chunk)``."""
    count = rows * k
    max_r = int(math.log2(chunk))
    r = int(take_array(arrays, "rice_r", np.uint8, 1)[0])
    if r > max_r:
        raise CodecError(f"payload Rice parameter {r} exceeds log2(chunk) = {max_r}")
    # An encoder picks the cheapest r, never worse than r = log2(chunk) (no quotients): so at most
    # count * (max_r + 1) bits in all, plus up to 7 padding bits per stream. This bounds the unary
    # stream before it is unpacked to 8 bytes per byte.
    budget = -(-count * (max_r + 1) // 8) + 1
    unary = take_bounded(arrays, "idx_unary", np.uint8, budget)
    remainders = take_array(arrays, "idx_rem", np.uint8, -(-count * r // 8))
    if unary.size + remainders.size > budget:
        raise CodecError(f"payload index streams take {unary.size + remainders.size} bytes, over {budget}")
    try:
        gaps = bitpack.rice_decode(unary, remainders, r=r, count=count)
    except ValueError as exc:
        raise CodecError(f"payload index stream is malformed: {exc}") from exc
    positions = np.cumsum(gaps.reshape(rows, k) + 1, axis=1) - 1
    if rows and int(positions[:, -1].max()) >= chunk:
        raise CodecError(f"payload index out of range: a position is >= chunk size {chunk}")
    return positions


def inverse_dct_sparse(positions: np.ndarray, values: np.ndarray, chunk: int) -> np.ndarray:
    """``(rows, chunk)`` float32 signal whose DCT has ``values`` at ``positions`` and zeros elsewhere.

    A sum of k scaled basis rows, in a fixed order of elementwise float32 operations: ``k * chunk``
    multiply-adds per row instead of a dense ``chunk**2`` product, and the same bits on every CPU.
    """
    matrix = dct_matrix(chunk)
    rows, k = positions.shape
    out = np.zeros((rows, chunk), dtype=np.float32)
    term = np.empty((min(rows, _ROWS_PER_BLOCK), chunk), dtype=np.float32)
    for start in range(0, rows, _ROWS_PER_BLOCK):
        stop = min(start + _ROWS_PER_BLOCK, rows)
        block, tmp = out[start:stop], term[: stop - start]
        for j in range(k):  # out += values[:, j] * matrix[positions[:, j]], in this order
            np.take(matrix, positions[start:stop, j], axis=0, out=tmp)
            np.multiply(tmp, values[start:stop, j, None], out=tmp)
            np.add(block, tmp, out=block)
    return out


def scatter_rows(positions: np.ndarray, values: np.ndarray, chunk: int) -> np.ndarray:
    """``(rows, chunk)`` float32 array with ``values`` at ``positions`` and zeros elsewhere."""
    out = np.zeros((positions.shape[0], chunk), dtype=np.float32)
    np.put_along_axis(out, positions, values, axis=1)
    return out


class TopKCodec(Codec):
    """Chunked top-k of the raw values, quantized, Rice-coded indices, error feedback."""

    name = "topk"
    version = 1
    PARAMS = ("chunk", "density", "bits", "ef_decay")
    transform: ClassVar[bool] = False  # DCT-II each chunk before selecting

    def __init__(self, *, chunk: int = 256, density: float = 1 / 64, bits: int = 2, ef_decay: float = 0.9) -> None:
        # chunk <= 4096: the cached DCT matrix is chunk**2 floats (64 MiB at 4096), the transform
        # chunk multiply-adds per element.
        self.chunk = int_param(self.name, "chunk", chunk, lo=4, hi=4096, power_of_two=True)
        self.density = float_param(self.name, "density", density, lo=0.0, hi=1.0, lo_open=True)
        self.bits = choice_param(self.name, "bits", bits, (2, 4, 8))
        self.ef_decay = float_param(self.name, "ef_decay", ef_decay, lo=0.0, hi=1.0)
        self.k = max(1, round(self.chunk * self.density))

    @property
    def decode_params(self) -> dict[str, int | float | str]:
        return {"chunk": self.chunk, "density": self.density, "bits": self.bits}

    def _array_keys(self) -> frozenset[str]:
        keys = {"scales", "codes", "rice_r", "idx_unary", "idx_rem"}
        return frozenset(keys | {"rho"} if self.bits == 2 else keys)

    def _max_body_bytes(self, numel: int) -> int:
        rows = -(-numel // self.chunk)
        count = rows * self.k
        index_bytes = -(-count * (int(math.log2(self.chunk)) + 1) // 8) + 1
        return 2 * rows + -(-count * self.bits // 8) + 2 + index_bytes

    def _compress(self, flat: torch.Tensor) -> dict[str, np.ndarray]:
        if flat.numel() and max(map(abs, map(float, torch.aminmax(flat)))) > quantize.MAX_INPUT_MAGNITUDE:
            raise ValueError(f"codec {self.name!r} takes values up to 2**100; this update has larger ones")
        rows = -(-flat.numel() // self.chunk)
        x = torch.nn.functional.pad(flat, (0, rows * self.chunk - flat.numel())).view(rows, self.chunk)
        if self.transform:
            x = x @ _dct_matrix_torch(self.chunk, x.device).T
        top_positions, top_values = select_topk(x, self.k)
        positions, values = top_positions.cpu().numpy(), top_values.cpu().numpy()
        if self.bits == 2:
            codes, scales, rho = quantize.quantize_2bit(values)
            arrays = {"rho": np.array([rho], dtype=np.uint8)}
        else:
            codes, scales = quantize.quantize_uniform(values, self.bits)
            arrays = {}
        arrays |= {"scales": scales, "codes": bitpack.pack_fixed(codes, self.bits)}
        return arrays | encode_positions(positions, self.chunk)

    def _decompress(self, arrays: Mapping[str, np.ndarray], numel: int) -> np.ndarray:
        rows = -(-numel // self.chunk)
        count = rows * self.k
        scales = take_array(arrays, "scales", np.uint16, rows)
        if not quantize.valid_scale_bits(scales):
            raise CodecError("payload scales must be finite, non-negative and at most 2**120")
        packed = take_array(arrays, "codes", np.uint8, -(-count * self.bits // 8))
        try:
            codes = bitpack.unpack_fixed(packed, self.bits, count).reshape(rows, self.k)
        except ValueError as exc:
            raise CodecError(f"payload value codes are malformed: {exc}") from exc
        if self.bits == 2:
            rho = int(take_array(arrays, "rho", np.uint8, 1)[0])
            if not 1 <= rho <= quantize.RHO_DENOMINATOR:
                raise CodecError(f"payload 2-bit level ratio {rho}/16 is outside [1/16, 16/16]")
            values = quantize.dequantize_2bit(codes, scales, rho)
        else:
            if count and int(codes.max()) > 2 * quantize.levels(self.bits):
                raise CodecError(f"payload {self.bits}-bit value code is out of range")
            values = quantize.dequantize_uniform(codes, scales, self.bits)
        positions = decode_positions(arrays, rows=rows, k=self.k, chunk=self.chunk)
        if self.transform:
            out = inverse_dct_sparse(positions, values, self.chunk)
        else:
            out = scatter_rows(positions, values, self.chunk)
        return out.reshape(-1)[:numel]


class DctTopKCodec(TopKCodec):
    """Top-k of each chunk's orthonormal DCT-II coefficients (DeMo / SparseLoCo style)."""

    name = "dct-topk"
    version = 1
    transform = True
