"""Round trips: every codec reproduces its input within its documented error bound."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.protocol.codecs import available_codecs, make_codec
from potluck.protocol.codecs.topk import dct_matrix
from tests.protocol.codecs.helpers import flat, spec, tensor_dicts


def _round_trip(name: str, tensors: dict, params: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    codec = make_codec(name, params)
    decoded = codec.decode(codec.encode(tensors), spec(tensors))
    assert list(decoded) == list(tensors)
    for key, t in tensors.items():
        assert decoded[key].shape == t.shape and decoded[key].dtype == torch.float32
    return flat(tensors), flat(decoded)


@given(tensor_dicts())
def test_none_is_exact(tensors: dict) -> None:
    x, y = _round_trip("none", tensors)
    assert torch.equal(x, y)


@given(tensor_dicts())
def test_fp16_relative_error(tensors: dict) -> None:
    x, y = _round_trip("fp16", tensors)
    # 2**-11 relative in fp16's normal range; below 2**-14, subnormals round to 2**-25 absolute
    assert torch.all((x - y).abs() <= 2.0**-11 * x.abs() + 2.0**-25)


@given(tensor_dicts(), st.sampled_from([8, 64, 256]), st.sampled_from(["fp16", "fp32"]))
def test_int8_error_is_half_a_step_per_block(tensors: dict, block: int, scale_dtype: str) -> None:
    x, y = _round_trip("int8", tensors, {"block": block, "scale_dtype": scale_dtype})
    pad = -x.numel() % block
    absmax = torch.nn.functional.pad(x, (0, pad)).view(-1, block).abs().amax(dim=1)
    bound = absmax / 127 / 2 * (1 + 2.0**-10) + 2.0**-25  # scale rounded up to fp16: <= 2**-10 relative
    err = torch.nn.functional.pad((x - y).abs(), (0, pad)).view(-1, block)
    assert torch.all(err <= bound[:, None])


@pytest.mark.parametrize("name", ["topk", "dct-topk"])
@given(tensors=tensor_dicts(), chunk=st.sampled_from([4, 16, 64]))
@settings(max_examples=40)
def test_sparse_dense_8bit_error_is_small(name: str, tensors: dict, chunk: int) -> None:
    x, y = _round_trip(name, tensors, {"density": 1.0, "bits": 8, "chunk": chunk})
    # Per chunk: every coefficient is off by at most half a step, absmax / 127 / 2 (scale rounded
    # up to bf16), and the DCT is orthonormal, so the L2 error <= sqrt(chunk) * absmax / 254.
    pad = -x.numel() % chunk
    chunks, errors = (torch.nn.functional.pad(v, (0, pad)).view(-1, chunk).double() for v in (x, x - y))
    coeffs = chunks @ torch.from_numpy(dct_matrix(chunk).astype(np.float64)).T if name == "dct-topk" else chunks
    bound = math.sqrt(chunk) * coeffs.abs().amax(dim=1) / 254 * (1 + 2.0**-7) + 1e-30
    assert torch.all(errors.norm(dim=1) <= bound * (1 + 1e-4) + 1e-6 * chunks.norm(dim=1))


@pytest.mark.parametrize("name", available_codecs())
@given(tensors=tensor_dicts())
@settings(max_examples=40)
def test_default_params_are_never_worse_than_sending_zeros(name: str, tensors: dict) -> None:
    x, y = _round_trip(name, tensors)
    assert (x - y).norm() <= x.norm() * (1 + 1e-5)


def test_dct_helps_on_smooth_signals() -> None:
    # Prepare: a smooth signal (energy in low frequencies), where the DCT should shine
    t = torch.linspace(0, 40, 65536)
    tensors = {"w": torch.sin(t) + 0.5 * torch.cos(3.1 * t)}
    # Execute
    errors = {}
    for name in ("topk", "dct-topk"):
        x, y = _round_trip(name, tensors)
        errors[name] = float((x - y).norm() / x.norm())
    # Assert
    assert errors["dct-topk"] < 0.5 * errors["topk"], errors
