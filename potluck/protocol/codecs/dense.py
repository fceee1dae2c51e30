"""Dense codecs: every element is sent. ``none`` (fp32), ``fp16`` and ``int8`` (blockwise absmax).

These are the reference arms: ``none`` is DiLoCo's fp32 exchange (4 bytes/param), ``fp16`` is
OpenDiLoCo's (2), ``int8`` is INTELLECT-1's (1 byte/param plus one scale per block). Error bounds,
for finite input within range:

- ``none``: exact.
- ``fp16``: relative error <= 2**-11 per element; magnitudes are clamped to fp16's max (65504) and
  values below 2**-14 lose relative precision (fp16 subnormals, absolute error <= 2**-25).
- ``int8``: per block, ``|x - x_hat| <= absmax_block / 127 / 2`` (the scale is rounded *up* to its
  storage type, so nothing clips). With fp16 scales, blocks whose absmax exceeds 127 * 65504 saturate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from potluck.protocol.codecs.base import Codec, CodecError, choice_param, int_param, take_array

_FP16_MAX = 65504.0  # largest finite float16
_INT8_LEVELS = 127  # symmetric range [-127, 127]; -128 is never sent, so it is rejected
# Largest scale decode accepts: 127 * scale stays finite in float32 (128, not 127, leaves rounding room).
_MAX_INT8_SCALE = np.float32(np.finfo(np.float32).max / 128)


def _finite_f32(values: np.ndarray, what: str) -> np.ndarray:
    """A fresh float32 copy of ``values``, or CodecError if any is NaN or infinite."""
    out = values.astype(np.float32)  # always a copy: the caller owns the result
    if not np.isfinite(out).all():
        raise CodecError(f"payload {what} contains NaN or infinite values")
    return out


class _CastCodec(Codec):
    """Every element sent as one floating-point type; no parameters, no state worth feeding back."""

    wire_dtype: type  # numpy dtype of the values on the wire

    @property
    def decode_params(self) -> dict[str, int | float | str]:
        return {}

    def _array_keys(self) -> frozenset[str]:
        return frozenset({"values"})

    def _max_body_bytes(self, numel: int) -> int:
        return np.dtype(self.wire_dtype).itemsize * numel

    def _compress(self, flat: torch.Tensor) -> dict[str, np.ndarray]:
        return {"values": flat.cpu().numpy().astype(self.wire_dtype)}

    def _decompress(self, arrays: Mapping[str, np.ndarray], numel: int) -> np.ndarray:
        return _finite_f32(take_array(arrays, "values", self.wire_dtype, numel), "values")


class NoneCodec(_CastCodec):
    """fp32, unchanged: the baseline every other codec is measured against."""

    name = "none"
    version = 1
    wire_dtype = np.float32


class Fp16Codec(_CastCodec):
    """IEEE half precision: half the bytes of fp32, relative error <= 2**-11."""

    name = "fp16"
    version = 1
    wire_dtype = np.float16

    def _compress(self, flat: torch.Tensor) -> dict[str, np.ndarray]:
        # Clamp first: a value past 65504 would become inf, which decode rightly rejects.
        return super()._compress(flat.clamp(-_FP16_MAX, _FP16_MAX))


def int8_quantize(x: np.ndarray, *, block: int, scale_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax int8: (int8 codes, one scale per block); ``x_hat = code * scale``.

    The scale is ``absmax / 127`` rounded up to ``scale_dtype``, so ``|x / scale| <= 127`` and the
    error is at most half a step. Empty and all-zero blocks get scale 0.
    """
    n_blocks = -(-x.size // block)
    padded = np.zeros(n_blocks * block, dtype=np.float32)
    padded[: x.size] = x
    blocks = padded.reshape(n_blocks, block)
    scale = np.abs(blocks).max(axis=1, initial=0.0) / np.float32(_INT8_LEVELS)
    # Saturate rather than send inf: values past 127 * max_scale are clipped.
    max_scale = np.float16(_FP16_MAX) if scale_dtype is np.float16 else _MAX_INT8_SCALE
    stored = np.minimum(scale, max_scale).astype(scale_dtype)
    if scale_dtype is np.float16:
        low = stored.astype(np.float32) < scale
        stored[low] = np.minimum(np.nextafter(stored[low], np.float16(np.inf)), max_scale)
    step = stored.astype(np.float32)
    safe = np.where(step > 0, step, np.float32(1.0))
    codes = np.clip(np.rint(blocks / safe[:, None]), -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8)
    return codes.reshape(-1)[: x.size], stored


def int8_dequantize(codes: np.ndarray, scales: np.ndarray, *, block: int) -> np.ndarray:
    """Inverse of `int8_quantize` (float32)."""
    n_blocks = scales.size
    padded = np.zeros(n_blocks * block, dtype=np.float32)
    padded[: codes.size] = codes
    out = padded.reshape(n_blocks, block) * scales.astype(np.float32)[:, None]
    return out.reshape(-1)[: codes.size]


class Int8Codec(Codec):
    """Blockwise absmax int8 (bitsandbytes / INTELLECT-1 style): ~1 byte per parameter."""

    name = "int8"
    version = 1
    PARAMS = ("block", "scale_dtype")
    _SCALE_DTYPES = {"fp16": np.float16, "fp32": np.float32}

    def __init__(self, *, block: int = 256, scale_dtype: str = "fp16") -> None:
        # 256 elements per scale: the scale costs 16/256 = 0.06 bits per param (0.8% of int8).
        self.block = int_param(self.name, "block", block, lo=8, hi=1 << 16)
        self.scale_dtype = choice_param(self.name, "scale_dtype", scale_dtype, tuple(self._SCALE_DTYPES))

    @property
    def decode_params(self) -> dict[str, int | float | str]:
        return {"block": self.block, "scale_dtype": self.scale_dtype}

    def _array_keys(self) -> frozenset[str]:
        return frozenset({"codes", "scales"})

    def _max_body_bytes(self, numel: int) -> int:
        return numel + 4 * -(-numel // self.block)

    def _compress(self, flat: torch.Tensor) -> dict[str, np.ndarray]:
        codes, scales = int8_quantize(
            flat.cpu().numpy(), block=self.block, scale_dtype=self._SCALE_DTYPES[self.scale_dtype]
        )
        return {"codes": codes, "scales": scales}

    def _decompress(self, arrays: Mapping[str, np.ndarray], numel: int) -> np.ndarray:
        scale_dtype = self._SCALE_DTYPES[self.scale_dtype]
        codes = take_array(arrays, "codes", np.int8, numel)
        scales = take_array(arrays, "scales", scale_dtype, -(-numel // self.block))
        # The encoder's scale is absmax / 127 of finite floats, so a larger one could only overflow.
        if not (np.isfinite(scales).all() and (scales >= 0).all() and (scales <= _MAX_INT8_SCALE).all()):
            raise CodecError("payload int8 scales must be finite, non-negative and at most float32 max / 127")
        if (codes == -128).any():
            raise CodecError("payload int8 code -128 is outside the symmetric range [-127, 127]")
        return int8_dequantize(codes, scales, block=self.block)
