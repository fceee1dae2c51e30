"""Hostile bytes: decode raises CodecError and nothing else, and allocates nothing big first."""

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.protocol.codecs import CodecError, available_codecs, make_codec
from tests.protocol.codecs.helpers import frame, split_payload, tamper

SPEC = {"emb": (50, 8), "bias": (13,), "scale": ()}
_x = {k: torch.randn(s, generator=torch.Generator().manual_seed(1)) for k, s in SPEC.items()}
CODECS = {name: make_codec(name) for name in available_codecs()}
VALID = {name: codec.encode(_x) for name, codec in CODECS.items()}


def _decode_or_codec_error(name: str, payload: bytes) -> None:
    """Decode; accept CodecError, or a result that honours the spec and is finite."""
    try:
        out = CODECS[name].decode(payload, SPEC)
    except CodecError as exc:
        assert "\n" not in str(exc)
        return
    assert {k: tuple(v.shape) for k, v in out.items()} == SPEC
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


@pytest.mark.parametrize("name", available_codecs())
@given(st.binary(max_size=400))
@settings(max_examples=50)
def test_random_bytes(name: str, data: bytes) -> None:
    with pytest.raises(CodecError):
        CODECS[name].decode(data, SPEC)
    with pytest.raises(CodecError):
        CODECS[name].decode(b"PLKC\x01" + data, SPEC)


@pytest.mark.parametrize("name", available_codecs())
def test_every_truncation(name: str) -> None:
    payload = VALID[name]
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            CODECS[name].decode(payload[:cut], SPEC)


@pytest.mark.parametrize("name", available_codecs())
@given(data=st.data())
@settings(max_examples=60)
def test_bit_flips(name: str, data: st.DataObject) -> None:
    payload = bytearray(VALID[name])
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(payload) - 1))
        payload[bit // 8] ^= 1 << (bit % 8)
    _decode_or_codec_error(name, bytes(payload))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"numel": 10**12}, "numel"),
        ({"shapes": [[10**6, 10**6], [13], []]}, "different model"),
        ({"names": ["emb", "bias"], "shapes": [[50, 8], [13]]}, "different model"),
        ({"names": ["emb", "bias", "other"]}, "different model"),
        ({"codec": "fp16"}, "codec"),
        ({"codec": 7}, "codec"),
        ({"codec_version": 2}, "version"),
        ({"params": {"chunk": 256, "density": 1.0, "bits": 2}}, "params"),
        ({"params": [1]}, "params"),
        ({"names": "emb"}, "names"),
        ({"extra": 1}, "keys"),
    ],
)
def test_bad_headers(change: dict, message: str) -> None:
    header, arrays = split_payload(VALID["dct-topk"])
    with pytest.raises(CodecError, match=message):
        CODECS["dct-topk"].decode(frame({**header, **change}, arrays), SPEC)


def test_bad_framing() -> None:
    header, arrays = split_payload(VALID["none"])
    for payload, message in [
        (frame(header, arrays, magic=b"PLKX"), "PLKC"),
        (frame(header, arrays, version=2), "version"),
        (b"PLKC\x01" + (2**31).to_bytes(4, "little") + b"{}", "header length"),
        (b"PLKC\x01\x01\x00\x00\x00\xc1", "msgpack"),  # 0xc1 is never valid msgpack
        (b"PLKC\x01\x01\x00\x00\x00\x07", "keys"),
        (frame(header, b"not safetensors"), "safetensors"),
        (frame(header, {**arrays, "more": np.zeros(1, np.uint8)}), "arrays"),
    ]:
        with pytest.raises(CodecError, match=message):
            CODECS["none"].decode(payload, SPEC)
    with pytest.raises(CodecError):
        CODECS["none"].decode("not bytes", SPEC)  # type: ignore[arg-type]


def test_huge_claims_are_refused_before_allocating() -> None:
    # Prepare: a header that claims 10**12 elements, for a spec that matches it, but a tiny body
    huge = {"w": (10**6, 10**6)}
    header, arrays = split_payload(VALID["none"])
    header |= {"names": ["w"], "shapes": [[10**6, 10**6]], "numel": 10**12}
    claim = frame(header, arrays)
    # Execute
    tracemalloc.start()
    for spec in (SPEC, huge):
        for name in ("none", "int8", "dct-topk"):
            with pytest.raises(CodecError):
                CODECS[name].decode(claim, spec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Assert
    assert peak < 1 << 20


def _u8(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint8)


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("none", {"values": np.full(414, np.nan, np.float32)}, "NaN"),
        ("none", {"values": np.zeros(414, np.float64)}, "float32"),
        ("none", {"values": np.zeros(413, np.float32)}, "float32"),
        ("none", {"values": None}, "arrays"),
        ("fp16", {"values": np.full(414, np.inf, np.float16)}, "NaN or inf"),
        ("int8", {"scales": np.array([np.nan, 1], np.float16)}, "scales"),
        ("int8", {"scales": np.array([-1, 1], np.float16)}, "scales"),
        ("int8", {"scales": np.array([np.inf, 1], np.float16)}, "scales"),
        ("int8", {"scales": np.array([1, 1], np.float32)}, "float16"),
        ("int8", {"codes": np.full(414, -128, np.int8)}, "-128"),
        ("int8", {"codes": np.zeros(414, np.uint8)}, "int8"),
        ("dct-topk", {"scales": np.array([0x7FC0, 0], np.uint16)}, "scales"),  # NaN
        ("dct-topk", {"scales": np.array([0x7F80, 0], np.uint16)}, "scales"),  # inf
        ("dct-topk", {"scales": np.array([0xBF80, 0], np.uint16)}, "scales"),  # -1
        ("dct-topk", {"scales": np.array([1, 1], np.float16)}, "uint16"),
        ("dct-topk", {"rho": _u8(0)}, "ratio"),
        ("dct-topk", {"rho": _u8(17)}, "ratio"),
        ("dct-topk", {"rho": _u8(1, 2)}, "rho"),
        ("dct-topk", {"rice_r": _u8(9)}, "Rice"),
        ("dct-topk", {"codes": _u8(0, 0, 0)}, "codes"),
        ("dct-topk", {"idx_unary": np.zeros(2, np.uint8)}, "malformed"),  # 16 codes, not 8
        ("dct-topk", {"idx_unary": np.zeros(100, np.uint8)}, "idx_unary"),
        ("dct-topk", {"idx_unary": np.zeros(10**4, np.uint8)}, "body"),
        ("dct-topk", {"idx_rem": None}, "arrays"),
    ],
)
def test_bad_arrays(name: str, changes: dict, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        CODECS[name].decode(tamper(CODECS[name], VALID[name], **changes), SPEC)


def test_index_out_of_range_is_refused() -> None:
    # Prepare: one 8-element chunk, k = 2; first gap 7 then gap 0 puts the second index at 8
    codec = make_codec("topk", {"chunk": 8, "density": 0.25, "bits": 4})
    x = {"w": torch.arange(8.0)}
    payload = codec.encode(x)
    unary_r0 = np.packbits(np.array([1] * 7 + [0] + [0] + [1] * 7, np.uint8), bitorder="little")
    # Execute / Assert
    with pytest.raises(CodecError, match="out of range"):
        codec.decode(tamper(codec, payload, rice_r=_u8(0), idx_rem=_u8()[:0], idx_unary=unary_r0), {"w": (8,)})


def test_four_bit_code_out_of_range_is_refused() -> None:
    codec = make_codec("topk", {"chunk": 8, "density": 0.25, "bits": 4})
    payload = codec.encode({"w": torch.arange(8.0)})
    with pytest.raises(CodecError, match="out of range"):
        codec.decode(tamper(codec, payload, codes=_u8(0xFF)), {"w": (8,)})


@pytest.mark.parametrize("name", available_codecs())
def test_mismatched_spec_is_a_different_model(name: str) -> None:
    for spec in ({**SPEC, "bias": (14,)}, {"bias": (13,), "emb": (50, 8), "scale": ()}, {}):
        with pytest.raises(CodecError, match="different model"):
            CODECS[name].decode(VALID[name], spec)


@pytest.mark.parametrize("name", ["int8", "topk", "dct-topk"])
@given(data=st.data())
@settings(max_examples=60)
def test_bit_flips_in_the_packed_arrays(name: str, data: st.DataObject) -> None:
    # The last bytes are array data (not headers), where only the codec's own checks stand guard.
    payload = bytearray(VALID[name])
    for _ in range(data.draw(st.integers(1, 4))):
        byte = data.draw(st.integers(len(payload) - 24, len(payload) - 1))
        payload[byte] ^= 1 << data.draw(st.integers(0, 7))
    _decode_or_codec_error(name, bytes(payload))


@pytest.mark.parametrize("name", ["topk", "dct-topk"])
@given(data=st.data())
@settings(max_examples=60)
def test_random_array_contents_of_the_right_shapes(name: str, data: st.DataObject) -> None:
    # Prepare: every array replaced by random bytes of its valid dtype and length
    _, arrays = split_payload(VALID[name])
    changes = {}
    for key, array in sorted(arrays.items()):
        raw = data.draw(st.binary(min_size=array.nbytes, max_size=array.nbytes))
        changes[key] = np.frombuffer(raw, dtype=array.dtype).copy()
    # Execute / Assert
    _decode_or_codec_error(name, tamper(CODECS[name], VALID[name], **changes))
