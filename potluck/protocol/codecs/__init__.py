"""Codecs: pseudo-gradient <-> compact, validated payload bytes.

``make_codec("dct-topk")`` gives the default codec (DCT-II top-k 1/64, 2-bit values, Rice-coded
indices: ~0.027 bytes per parameter); ``none``, ``fp16``, ``int8`` and ``topk`` are the reference
arms. Every payload is ``b"PLKC"`` + msgpack header + safetensors body (see `base`); decoding
hostile bytes raises `CodecError` and nothing else. `encode_aggregate` is how an aggregator sends one
compressed aggregate back (the combine rules themselves are in training/combine.py).
"""

from potluck.protocol.codecs.aggregate import encode_aggregate
from potluck.protocol.codecs.base import (
    Codec,
    CodecError,
    NonFiniteError,
    TensorSpec,
    available_codecs,
    codec_from_payload,
    make_codec,
    spec_of,
)
from potluck.protocol.codecs.dense import Fp16Codec, Int8Codec, NoneCodec
from potluck.protocol.codecs.topk import DctTopKCodec, TopKCodec

__all__ = [
    "Codec",
    "CodecError",
    "DctTopKCodec",
    "Fp16Codec",
    "Int8Codec",
    "NonFiniteError",
    "NoneCodec",
    "TensorSpec",
    "TopKCodec",
    "available_codecs",
    "codec_from_payload",
    "encode_aggregate",
    "make_codec",
    "spec_of",
]
