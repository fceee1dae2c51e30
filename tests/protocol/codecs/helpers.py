"""Shared strategies and payload surgery for the codec tests."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import msgpack
import numpy as np
import safetensors.numpy
import torch
from hypothesis import strategies as st

from potluck.protocol.codecs import Codec

# Shapes a model really has: 0-d scalars, vectors, matrices, an empty tensor; sizes that are not
# multiples of any chunk or block.
shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 300)),
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 7)),
)


@st.composite
def tensor_dicts(draw: st.DrawFn, *, max_tensors: int = 4, scale: float | None = None) -> dict[str, torch.Tensor]:
    """An ordered dict of random fp32 tensors; magnitudes vary per tensor from 1e-4 to 1e3."""
    n = draw(st.integers(1, max_tensors))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        shape = draw(shapes)
        magnitude = scale if scale is not None else 10.0 ** draw(st.integers(-4, 3))
        values = rng.standard_normal(math.prod(shape)).astype(np.float32) * np.float32(magnitude)
        if draw(st.booleans()):
            values[rng.random(values.size) < 0.5] = 0.0  # sparse tensors: ties and zero chunks
        out[f"layer{i}.weight"] = torch.from_numpy(values).reshape(shape)
    return out


def spec(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1).float() for t in tensors.values()])


def split_payload(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, body arrays) of a valid payload."""
    (header_len,) = struct.unpack_from("<I", payload, 5)
    header = msgpack.unpackb(payload[9 : 9 + header_len], raw=False)
    return header, safetensors.numpy.load(payload[9 + header_len :])


def frame(
    header: Mapping, arrays: Mapping[str, np.ndarray] | bytes, *, magic: bytes = b"PLKC", version: int = 1
) -> bytes:
    """A payload from a header and body arrays (or raw body bytes), bypassing every encoder check."""
    raw = msgpack.packb(dict(header), use_bin_type=True)
    body = arrays if isinstance(arrays, bytes) else safetensors.numpy.save(dict(arrays))
    return magic + struct.pack("<BI", version, len(raw)) + raw + body


def tamper(codec: Codec, payload: bytes, **changes: np.ndarray | None) -> bytes:
    """The payload with body arrays replaced (None: removed)."""
    header, arrays = split_payload(payload)
    arrays = dict(arrays)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = value
    return frame(header, arrays)
