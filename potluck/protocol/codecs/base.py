"""The codec interface: payload framing, spec checks, error feedback and the registry.

A codec turns a pseudo-gradient (an ordered ``dict[str, Tensor]`` of fp32 tensors) into bytes and
back. Everything that is not the compression math lives here, once, so that every codec frames,
validates and feeds back errors the same way:

    payload = b"PLKC" | u8 format version | u32 header length | msgpack header | safetensors body

The header is ``{codec, codec_version, params, names, shapes, numel}``; the body holds the codec's
packed arrays, computed on the *concatenation* of all tensors flattened in spec order, so a body
holds a handful of arrays however many tensors the model has. Decoding trusts nothing: the header
must describe exactly the model the caller expects (its spec) before anything is allocated, and
every array's dtype and length is checked before it is read. Hostile bytes raise `CodecError`,
and nothing else.
"""

from __future__ import annotations

import logging
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import msgpack
import numpy as np
import safetensors.numpy
import torch

from potluck.errors import PotluckError

logger = logging.getLogger(__name__)

MAGIC = b"PLKC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sBI")  # magic, format version, header length
# A header is ~60 bytes per tensor (name + shape): 1 MiB covers ~15k tensors, beyond the largest
# mixture-of-experts checkpoints, while keeping what a hostile header can make us parse small.
MAX_HEADER_BYTES = 1 << 20
# Slack for safetensors' own JSON header (~80 bytes per array, a handful of arrays per body).
_BODY_SLACK_BYTES = 4096
_HEADER_KEYS = ("codec", "codec_version", "params", "names", "shapes", "numel")

TensorSpec = Mapping[str, tuple[int, ...]]


class NonFiniteError(PotluckError, ValueError):
    """`encode` was given NaN or infinity: the sender's training diverged; nothing may be published."""


class CodecError(PotluckError):
    """Unusable codec bytes or codec parameters; the message is one line and says what is wrong."""


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The spec (names -> shapes, in order) that decoding a payload of these tensors needs."""
    return {name: tuple(t.shape) for name, t in tensors.items()}


def spec_numel(spec: TensorSpec) -> int:
    """Total element count of a spec."""
    return sum(math.prod(shape) for shape in spec.values())


def _short(value: object, limit: int = 80) -> str:
    """repr() cut to one short line, for messages that quote values from untrusted bytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- parameters ----


def int_param(codec: str, name: str, value: object, *, lo: int, hi: int, power_of_two: bool = False) -> int:
    """Validate an integer codec parameter, or raise CodecError naming it."""
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        if not power_of_two or value & (value - 1) == 0:
            return value
    kind = "a power of two" if power_of_two else "an integer"
    raise CodecError(f"codec {codec!r}: param {name!r} must be {kind} in [{lo}, {hi}], got {_short(value)}")


def float_param(codec: str, name: str, value: object, *, lo: float, hi: float, lo_open: bool = False) -> float:
    """Validate a real codec parameter in ``[lo, hi]`` (``(lo, hi]`` if lo_open), or raise CodecError."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        if (lo < value if lo_open else lo <= value) and value <= hi:
            return float(value)
    interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
    raise CodecError(f"codec {codec!r}: param {name!r} must be a number in {interval}, got {_short(value)}")


def choice_param(codec: str, name: str, value: object, choices: tuple[Any, ...]) -> Any:
    """Validate a parameter that takes one of a few values, or raise CodecError listing them."""
    if isinstance(value, bool) or value not in choices:
        raise CodecError(f"codec {codec!r}: param {name!r} must be one of {list(choices)}, got {_short(value)}")
    return value


# ---------------------------------------------------------------- body arrays ----


def take_array(arrays: Mapping[str, np.ndarray], key: str, dtype: np.dtype | type, length: int) -> np.ndarray:
    """``arrays[key]``, checked to be a flat array of exactly ``dtype`` and ``length``, else CodecError."""
    array = arrays[key]
    if array.dtype != np.dtype(dtype) or array.shape != (length,):
        raise CodecError(
            f"payload array {key!r} must be {np.dtype(dtype).name}[{length}], "
            f"got {array.dtype.name}{list(array.shape)}"
        )
    return array


def take_bounded(arrays: Mapping[str, np.ndarray], key: str, dtype: np.dtype | type, max_length: int) -> np.ndarray:
    """Like `take_array`, for a data-dependent length: at most ``max_length`` elements."""
    array = arrays[key]
    if array.dtype != np.dtype(dtype) or array.ndim != 1 or array.size > max_length:
        raise CodecError(
            f"payload array {key!r} must be {np.dtype(dtype).name}[<={max_length}], "
            f"got {array.dtype.name}{list(array.shape)}"
        )
    return array


# ---------------------------------------------------------------- the codec ----

_REGISTRY: dict[str, type[Codec]] = {}


class Codec(ABC):
    """Compresses a pseudo-gradient into payload bytes and back; subclasses supply only the math.

    Subclasses set ``name``, ``version`` and ``PARAMS`` (the keyword-only arguments of their
    ``__init__``), and implement `_compress`, `_decompress`, `_array_keys` and `_max_body_bytes`.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    PARAMS: ClassVar[tuple[str, ...]] = ()
    # Error feedback: x = tensors + ef_decay * residual. 1.0 accumulates everything not yet sent.
    ef_decay: float = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register every concrete codec by name; a duplicate name fails at import time."""
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise TypeError(f"codec name {cls.name!r} is taken by {_REGISTRY[cls.name].__qualname__}")
            _REGISTRY[cls.name] = cls

    @property
    @abstractmethod
    def decode_params(self) -> dict[str, int | float | str]:
        """The parameters a decoder needs; written to every header and checked on decode."""

    @property
    def params(self) -> dict[str, int | float | str]:
        """All parameters, decode-side and encode-side (``ef_decay``)."""
        return {name: getattr(self, name) for name in self.PARAMS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # -- hooks: pure functions of the flat vector / the body arrays ----------------

    @abstractmethod
    def _compress(self, flat: torch.Tensor) -> dict[str, np.ndarray]:
        """Packed arrays for a flat fp32 vector (any device); only numpy arrays reach the wire."""

    @abstractmethod
    def _decompress(self, arrays: Mapping[str, np.ndarray], numel: int) -> np.ndarray:
        """The flat fp32 vector (length ``numel``, finite) from body arrays; CodecError on bad arrays.

        ``arrays`` holds exactly `_array_keys` but nothing else is checked yet: check each array's
        dtype and length (`take_array`) and every value before using it.
        """

    @abstractmethod
    def _array_keys(self) -> frozenset[str]:
        """The names of the body arrays."""

    @abstractmethod
    def _max_body_bytes(self, numel: int) -> int:
        """An upper bound on the arrays' total bytes for ``numel`` elements (what decode accepts)."""

    # -- public API ---------------------------------------------------------------

    def max_payload_bytes(self, spec: TensorSpec) -> int:
        """The largest payload this codec emits (and `decode` accepts) for a model: an oversize check."""
        header = self._header(list(spec), [list(s) for s in spec.values()], spec_numel(spec))
        return _PREFIX.size + len(header) + _BODY_SLACK_BYTES + self._max_body_bytes(spec_numel(spec))

    def encode(self, tensors: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor] | None = None) -> bytes:
        """Compress ``tensors`` into payload bytes, with error feedback when ``state`` is given.

        ``state`` is the caller's error-feedback residual (one per sender; ``{}`` at first). The
        codec compresses ``x = tensors + ef_decay * residual`` and stores ``x - decode(payload)``
        back into ``state`` in place, so what one round drops is sent in later rounds.
        Raises ValueError for non-float input, NonFiniteError for non-finite input (never publish a
        diverged update).
        """
        names = list(tensors)
        shapes = [list(t.shape) for t in tensors.values()]
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"tensor {name!r} must be a floating-point torch.Tensor")
        flat = _flatten(list(tensors.values()))
        if state:  # an empty state is a zero residual
            flat.add_(_flatten_state(state, tensors, like=flat), alpha=self.ef_decay)
        if not _all_finite(flat):
            raise NonFiniteError(f"cannot encode non-finite values (in {_first_nonfinite(tensors, flat)!r})")
        arrays = self._compress(flat)
        if state is not None:
            sent = torch.from_numpy(self._decompress(arrays, flat.numel())).to(flat.device)
            _store_state(state, tensors, flat - sent)
        header = self._header(names, shapes, flat.numel())
        if len(header) > MAX_HEADER_BYTES:
            raise ValueError(f"the model's names and shapes take {len(header)} bytes, over {MAX_HEADER_BYTES}")
        return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + safetensors.numpy.save(arrays)

    def decode(self, payload: bytes, spec: TensorSpec) -> dict[str, torch.Tensor]:
        """Tensors (fp32, CPU, finite, shaped as ``spec``) from payload bytes; CodecError on bad bytes.

        Nothing larger than the spec implies is allocated, whatever the header claims: the header
        must match the spec exactly, and the body must fit `max_payload_bytes`, before either is used.
        """
        header, body = _split(payload)
        if header["codec"] != self.name:
            raise CodecError(f"payload was encoded with codec {_short(header['codec'])}, not {self.name!r}")
        if header["codec_version"] != self.version:
            raise CodecError(
                f"payload is codec {self.name!r} version {_short(header['codec_version'])}; this node reads "
                f"version {self.version}: upgrade potluck on the older side"
            )
        if header["params"] != self.decode_params:
            raise CodecError(
                f"payload was encoded with {self.name} params {_short(header['params'])}, this node expects "
                f"{self.decode_params}: both sides must use the run config's codec params"
            )
        _check_spec(header, spec)
        numel = header["numel"]
        if len(body) > self._max_body_bytes(numel) + _BODY_SLACK_BYTES:
            raise CodecError(f"payload body is {len(body)} bytes, more than codec {self.name!r} ever sends here")
        try:
            arrays = safetensors.numpy.load(body)
        except Exception as exc:  # the parser's errors are many and unexported; all mean "bad body"
            raise CodecError(f"payload body is not valid safetensors: {_short(str(exc))}") from exc
        if set(arrays) != self._array_keys():
            raise CodecError(f"payload arrays are {sorted(arrays)[:8]}, expected {sorted(self._array_keys())}")
        flat = self._decompress(arrays, numel)
        if flat.dtype != np.float32 or flat.shape != (numel,):
            raise AssertionError(f"{self.name} decompressed to {flat.dtype}{flat.shape}, not float32[{numel}]")
        return _unflatten(torch.from_numpy(flat), spec)

    def _header(self, names: list[str], shapes: list[list[int]], numel: int) -> bytes:
        header = {
            "codec": self.name,
            "codec_version": self.version,
            "params": self.decode_params,
            "names": names,
            "shapes": shapes,
            "numel": numel,
        }
        return msgpack.packb(header, use_bin_type=True)


# ---------------------------------------------------------------- framing ----


def _split(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """(validated header, body) of a payload; CodecError unless the framing is well formed."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < _PREFIX.size:
        raise CodecError(f"payload is {len(payload)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"payload does not start with {MAGIC!r}: not a potluck codec payload")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"payload format version {version} is not {FORMAT_VERSION}: upgrade potluck on the older side"
        )
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(payload):
        raise CodecError(f"payload header length {header_len} exceeds the payload or {MAX_HEADER_BYTES} bytes")
    raw = payload[_PREFIX.size : _PREFIX.size + header_len]
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise CodecError(f"payload header is not valid msgpack: {_short(str(exc))}") from exc
    if not isinstance(header, dict) or set(header) != set(_HEADER_KEYS):
        keys = list(header)[:8] if isinstance(header, dict) else type(header).__name__
        raise CodecError(f"payload header must have keys {list(_HEADER_KEYS)}, got {_short(keys)}")
    if not isinstance(header["codec"], str) or not isinstance(header["params"], dict):
        raise CodecError("payload header's codec must be a string and its params a map")
    return header, payload[_PREFIX.size + header_len :]


def _check_spec(header: Mapping[str, Any], spec: TensorSpec) -> None:
    """CodecError unless the header's names, shapes and numel are exactly the caller's spec."""
    names, shapes, numel = header["names"], header["shapes"], header["numel"]
    if not isinstance(names, list) or not isinstance(shapes, list) or len(names) != len(shapes):
        raise CodecError("payload header's names and shapes must be lists of equal length")
    if len(names) != len(spec):
        raise CodecError(f"payload is for a different model: {len(names)} tensors, this model has {len(spec)}")
    for i, (name, shape, (want_name, want_shape)) in enumerate(zip(names, shapes, spec.items(), strict=True)):
        if name != want_name or not isinstance(shape, list) or tuple(shape) != tuple(want_shape):
            raise CodecError(
                f"payload is for a different model: tensor {i} is {_short(name, 60)} {_short(shape, 40)}, "
                f"this model has {want_name!r} {list(want_shape)}"
            )
    if type(numel) is not int or numel != spec_numel(spec):
        raise CodecError(f"payload header's numel {_short(numel)} does not match its shapes")


def codec_from_payload(payload: bytes) -> str:
    """The registered codec name in a payload's header (CodecError if the framing or name is bad)."""
    header, _ = _split(payload)
    if header["codec"] not in _REGISTRY:
        raise CodecError(f"payload names unknown codec {_short(header['codec'])}; available: {available_codecs()}")
    return header["codec"]


# ---------------------------------------------------------------- registry ----


def available_codecs() -> list[str]:
    """Registered codec names, sorted."""
    return sorted(_REGISTRY)


def make_codec(name: str, params: Mapping[str, object] | None = None) -> Codec:
    """A codec by registry name with validated params; CodecError names an unknown codec or param."""
    if name not in _REGISTRY:
        raise CodecError(f"unknown codec {_short(name)}; available: {', '.join(available_codecs())}")
    cls = _REGISTRY[name]
    params = dict(params or {})
    unknown = sorted(set(params) - set(cls.PARAMS))
    if unknown:
        known = ", ".join(cls.PARAMS) or "none"
        raise CodecError(f"codec {name!r}: unknown param {_short(unknown[0])}; known params: {known}")
    return cls(**params)


# ---------------------------------------------------------------- tensors <-> flat ----


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A new contiguous fp32 vector of all tensors in order (on their device)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    if len(tensors) == 1:
        return tensors[0].detach().reshape(-1).to(torch.float32, copy=True)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def _all_finite(flat: torch.Tensor) -> bool:
    """True unless ``flat`` holds a NaN or an infinity (min and max propagate both; no temporaries)."""
    if not flat.numel():
        return True
    low, high = torch.aminmax(flat)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _unflatten(flat: torch.Tensor, spec: TensorSpec) -> dict[str, torch.Tensor]:
    """Split a flat vector into views shaped as ``spec``."""
    sizes = [math.prod(shape) for shape in spec.values()]
    parts = torch.split(flat, sizes) if sizes else []
    return {name: part.view(shape) for (name, shape), part in zip(spec.items(), parts, strict=True)}


def _flatten_state(
    state: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], *, like: torch.Tensor
) -> torch.Tensor:
    """The (non-empty) residual as one flat vector on ``like``'s device."""
    if set(state) != set(tensors) or any(tuple(state[k].shape) != tuple(t.shape) for k, t in tensors.items()):
        raise ValueError("error-feedback state is for a different model; start from an empty dict")
    return _flatten([state[name] for name in tensors]).to(like.device)


def _store_state(state: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], residual: torch.Tensor) -> None:
    """Write the flat residual back into ``state`` per tensor, reusing its tensors when present."""
    for (name, t), part in zip(
        tensors.items(), torch.split(residual, [t.numel() for t in tensors.values()]), strict=True
    ):
        part = part.view(t.shape)
        if name in state:
            state[name].copy_(part)
        else:
            state[name] = part.clone()


def _first_nonfinite(tensors: Mapping[str, torch.Tensor], flat: torch.Tensor) -> str:
    """The name of the first tensor whose (residual-added) values are not all finite."""
    offset = 0
    for name, t in tensors.items():
        if not _all_finite(flat[offset : offset + t.numel()]):
            return name
        offset += t.numel()
    return "?"
