"""The codec registry, parameters, determinism, payload headers and payload size."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from potluck.protocol.codecs import (
    Codec,
    CodecError,
    available_codecs,
    codec_from_payload,
    make_codec,
    spec_of,
)
from tests.protocol.codecs.helpers import frame, split_payload, tensor_dicts


def test_available_codecs() -> None:
    assert available_codecs() == ["dct-topk", "fp16", "int8", "none", "topk"]


def test_a_duplicate_name_fails_at_class_creation() -> None:
    with pytest.raises(TypeError, match="taken"):

        class Again(Codec):  # noqa: F841
            name = "none"


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("zip", None, "unknown codec 'zip'; available: dct-topk, fp16"),
        ("int8", {"blok": 64}, "unknown param 'blok'; known params: block, scale_dtype"),
        ("none", {"bits": 2}, "unknown param 'bits'"),
        ("int8", {"block": 4}, "'block' must be an integer in [8, 65536]"),
        ("int8", {"block": 64.0}, "'block'"),
        ("int8", {"scale_dtype": "bf16"}, "'scale_dtype' must be one of ['fp16', 'fp32']"),
        ("dct-topk", {"density": 0}, "'density' must be a number in (0.0, 1.0]"),
        ("dct-topk", {"density": 1.5}, "'density'"),
        ("dct-topk", {"density": True}, "'density'"),
        ("dct-topk", {"density": float("nan")}, "'density'"),
        ("dct-topk", {"chunk": 100}, "'chunk' must be a power of two in [4, 4096]"),
        ("dct-topk", {"chunk": 8192}, "'chunk'"),
        ("topk", {"bits": 3}, "'bits' must be one of [2, 4, 8]"),
        ("topk", {"bits": True}, "'bits'"),
        ("topk", {"ef_decay": 1.5}, "'ef_decay'"),
    ],
)
def test_bad_names_and_params_are_named(name: str, params: dict | None, message: str) -> None:
    with pytest.raises(CodecError) as caught:
        make_codec(name, params)
    assert message in str(caught.value)


def test_params_and_defaults() -> None:
    codec = make_codec("dct-topk")
    assert codec.params == {"chunk": 256, "density": 1 / 64, "bits": 2, "ef_decay": 0.9}
    assert codec.decode_params == {"chunk": 256, "density": 1 / 64, "bits": 2}
    assert codec.k == 4
    assert make_codec("int8").params == {"block": 256, "scale_dtype": "fp16"}
    assert "DctTopKCodec(chunk=256" in repr(codec)


@pytest.mark.parametrize("name", available_codecs())
@given(tensors=tensor_dicts())
@settings(max_examples=30)
def test_deterministic_and_within_the_advertised_size(name: str, tensors: dict) -> None:
    # Prepare
    first, second = make_codec(name), make_codec(name)
    # Execute
    payload = first.encode(tensors)
    # Assert
    assert payload == second.encode({k: v.clone() for k, v in tensors.items()})
    assert len(payload) <= first.max_payload_bytes(spec_of(tensors))
    assert codec_from_payload(payload) == name


def test_codec_from_payload_refuses_bad_payloads() -> None:
    payload = make_codec("none").encode({"w": torch.ones(3)})
    header, arrays = split_payload(payload)
    with pytest.raises(CodecError, match="PLKC"):
        codec_from_payload(b"PLKX" + payload[4:])
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        codec_from_payload(frame({**header, "codec": "zip"}, arrays))


def test_a_different_codec_or_params_is_refused() -> None:
    x = {"w": torch.randn(1000)}
    payload = make_codec("dct-topk").encode(x)
    with pytest.raises(CodecError, match="encoded with codec 'dct-topk', not 'topk'"):
        make_codec("topk").decode(payload, spec_of(x))
    with pytest.raises(CodecError, match="params"):
        make_codec("dct-topk", {"density": 1 / 32}).decode(payload, spec_of(x))
    # ef_decay only shapes encoding: a payload decodes whatever the decoder's ef_decay
    assert make_codec("dct-topk", {"ef_decay": 0.9}).decode(payload, spec_of(x))["w"].shape == (1000,)


def test_dct_topk_default_payload_size_for_a_million_params() -> None:
    # Prepare
    n, chunk, k = 1_000_000, 256, 4
    x = {"w": torch.randn(n, generator=torch.Generator().manual_seed(0))}
    # Execute
    payload = make_codec("dct-topk").encode(x)
    # Assert: a bound from the format, not from a measurement. Per chunk: a 2-byte scale, k 2-bit
    # codes, and Rice-coded gaps at no more than the cost at r = log2(chunk / k) = 6: k * 7 bits
    # plus quotients summing to at most (chunk - k) >> 6 = 3. Framing: 9-byte prefix, msgpack
    # header (~130 bytes), safetensors header (8 + ~420 bytes of JSON); 1 KiB covers both.
    rows = math.ceil(n / chunk)
    index_bits = rows * (k * 7 + (chunk - k) // 64)
    bound = 9 + 1024 + 2 * rows + math.ceil(rows * k * 2 / 8) + 2 + math.ceil(index_bits / 8) + 1
    print(f"dct-topk defaults: {len(payload) / n:.5f} bytes/param (bound {bound / n:.5f})")
    assert len(payload) <= bound
    assert bound / n < 0.03


def test_decode_returns_writable_float32_cpu_tensors() -> None:
    x = {"a": torch.randn(3, 4), "s": torch.tensor(2.0), "e": torch.zeros(0, 5)}
    for name in available_codecs():
        out = make_codec(name).decode(make_codec(name).encode(x), spec_of(x))
        assert [(k, v.shape, v.dtype, v.device.type) for k, v in out.items()] == [
            (k, v.shape, torch.float32, "cpu") for k, v in x.items()
        ]
        out["a"].add_(1.0)  # the caller owns the result


def test_an_empty_model_round_trips() -> None:
    for name in available_codecs():
        codec = make_codec(name)
        assert codec.decode(codec.encode({}, {}), {}) == {}


def test_bf16_and_fp64_inputs_are_encoded_as_fp32() -> None:
    x = {"a": torch.randn(300, dtype=torch.float64), "b": torch.randn(7).bfloat16()}
    out = make_codec("none").decode(make_codec("none").encode(x), spec_of(x))
    assert np.allclose(out["a"].numpy(), x["a"].float().numpy())
    assert torch.equal(out["b"], x["b"].float())
