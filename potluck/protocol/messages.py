"""What the frames of each stream carry: handler names, request bodies, and signed-envelope + payload bodies.

Every conversation is one request frame and one reply frame on a fresh libp2p stream (see wire.py):

    handler            request frame                         reply frame
    potluck.state      STATE_REQUEST  {"public_key": b32}    STATE      envelope+payload (SignedState, safetensors)
    potluck.submit     SUBMIT         envelope+payload       SUBMIT_REPLY SignedReceipt bytes
    potluck.aggregate  AGGREGATE_REQUEST {"round": n}        AGGREGATE  envelope+payload (SignedAggregate, codec)
    potluck.receipt    RECEIPT_REQUEST {"round": n, "update": b32}  RECEIPT  SignedReceipt bytes (final)
    potluck.manifest   MANIFEST_REQUEST (as STATE_REQUEST)    MANIFEST   envelope+chunk digests (SignedState)
    potluck.chunk      CHUNK_REQUEST  state_chunks.ChunkRequest  CHUNK  one chunk of a state payload

Either side may answer with an ERROR frame instead. "envelope+payload" is a 4-byte big-endian envelope
length, the signed envelope's wire bytes, then the payload, so one frame carries both and the envelope
is bounded before it is parsed. Handler names carry no version: the frame header does, so a peer of
another version gets a message naming both versions instead of "no such handler".

Joiners fetch the state as a manifest from an aggregator and chunks from any holder (state_chunks.py);
peers serve potluck.chunk too. The state payload is a safetensors file: master parameters under
``param/``, outer-optimizer buffers under ``outer/``, and the RunConfig as TOML in the metadata, so a
joiner needs nothing but the stream.
"""

import hashlib
import json
import struct
from collections.abc import Mapping

import msgpack
import safetensors.torch
import torch

from potluck.errors import PotluckError
from potluck.protocol.config import ConfigError, RunConfig
from potluck.protocol.config_files import dump_run_config, run_config_from_toml
from potluck.protocol.file_store import TOKENIZERS, StoreError, stored

STATE_HANDLER = "potluck.state"
SUBMIT_HANDLER = "potluck.submit"
AGGREGATE_HANDLER = "potluck.aggregate"
RECEIPT_HANDLER = "potluck.receipt"
MANIFEST_HANDLER = "potluck.manifest"
CHUNK_HANDLER = "potluck.chunk"

# An ERROR frame whose text starts with this is "try again shortly", not "no": callers retry it.
BUSY_PREFIX = "busy: "

_LENGTH = struct.Struct(">I")
MAX_REQUEST_BYTES = 256  # the msgpack request bodies are a few dozen bytes
_PARAM = "param/"
_OUTER = "outer/"
_TOKENIZER = "file/tokenizer.json"  # the run's tokenizer file as bytes (a run with data.tokenizer only)


class MessageError(PotluckError):
    """A message body is malformed (one line)."""


def pack_envelope(envelope: bytes, payload: bytes) -> bytes:
    """One frame body holding a signed envelope's bytes and the payload it signs."""
    return _LENGTH.pack(len(envelope)) + envelope + payload


def unpack_envelope(body: bytes, *, max_envelope_bytes: int) -> tuple[bytes, bytes]:
    """Split a body from `pack_envelope` into (envelope, payload); the envelope length is checked first."""
    if len(body) < _LENGTH.size:
        raise MessageError(f"message body is {len(body)} bytes, too short for its envelope length")
    (length,) = _LENGTH.unpack_from(body)
    if length > max_envelope_bytes or length > len(body) - _LENGTH.size:
        raise MessageError(
            f"message declares a {length}-byte envelope; the limit is {max_envelope_bytes} and the body holds "
            f"{len(body) - _LENGTH.size}"
        )
    end = _LENGTH.size + length
    return body[_LENGTH.size : end], body[end:]


def _unpack_request(body: bytes, key: str, what: str) -> object:
    return _unpack_request_map(body, (key,), what)[0]


def _unpack_request_map(
    body: bytes, keys: tuple[str, ...], what: str, *, optional: tuple[str, ...] = ()
) -> list[object]:
    """The values of `keys` (required) then `optional` (None when absent) of a small msgpack request map."""
    if len(body) > MAX_REQUEST_BYTES:
        raise MessageError(f"{what} request is {len(body)} bytes, over the {MAX_REQUEST_BYTES}-byte limit")
    try:
        request = msgpack.unpackb(body, raw=False, max_array_len=4, max_map_len=4, max_str_len=64, max_bin_len=64)
    except Exception as e:  # msgpack raises many types on garbage
        raise MessageError(f"{what} request is not valid msgpack ({type(e).__name__})") from e
    if not isinstance(request, dict) or not all(key in request for key in keys):
        raise MessageError(f"{what} request must be a map with {', '.join(map(repr, keys))}")
    return [request[key] for key in keys] + [request.get(key) for key in optional]


def state_request(public_key: bytes, *, client_mode: bool | None = None) -> bytes:
    """The STATE_REQUEST body: who asks, so the aggregator expects an update from it in the open round.

    `client_mode`: whether the peer dials out only (behind a NAT), for the status page; None: unsaid.
    """
    request: dict[str, object] = {"public_key": public_key}
    if client_mode is not None:
        request["client_mode"] = client_mode
    return msgpack.packb(request, use_bin_type=True)


def parse_state_request(body: bytes) -> bytes:
    """The requester's claimed public key (unauthenticated: used only to wait for its update)."""
    return parse_state_request_mode(body)[0]


def parse_state_request_mode(body: bytes) -> tuple[bytes, bool | None]:
    """(claimed public key, claimed client mode or None); both unauthenticated, for waiting and display only."""
    key, mode = _unpack_request_map(body, ("public_key",), "state", optional=("client_mode",))
    if not isinstance(key, bytes) or len(key) != 32:
        raise MessageError("state request's public_key must be 32 bytes")
    return key, mode if type(mode) is bool else None


def aggregate_request(round_index: int) -> bytes:
    """The AGGREGATE_REQUEST body for round `round_index`."""
    return msgpack.packb({"round": round_index}, use_bin_type=True)


def parse_aggregate_request(body: bytes) -> int:
    """The round a peer asks the aggregate of."""
    round_index = _unpack_request(body, "round", "aggregate")
    if type(round_index) is not int or not 0 <= round_index < 2**63:
        raise MessageError("aggregate request's round must be a non-negative integer")
    return round_index


def receipt_request(round_index: int, update_digest: bytes) -> bytes:
    """The RECEIPT_REQUEST body: the final receipt of the update named by `update_digest` in round `round_index`."""
    return msgpack.packb({"round": round_index, "update": update_digest}, use_bin_type=True)


def parse_receipt_request(body: bytes) -> tuple[int, bytes]:
    """(round, UpdateHeader digest) a peer asks the final receipt of."""
    round_index, digest = _unpack_request_map(body, ("round", "update"), "receipt")
    if type(round_index) is not int or not 0 <= round_index < 2**63:
        raise MessageError("receipt request's round must be a non-negative integer")
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise MessageError("receipt request's update must be a 32-byte digest")
    return round_index, digest


def encode_state_payload(
    cfg: RunConfig, *, params: Mapping[str, torch.Tensor], outer_state: Mapping[str, torch.Tensor]
) -> bytes:
    """The state payload: parameters and outer buffers as safetensors, the config as TOML metadata.

    A run with a tokenizer carries its file too (from this machine's store), so joiners need not have it.
    """
    tensors = {_PARAM + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in params.items()}
    tensors |= {_OUTER + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in outer_state.items()}
    if cfg.data.tokenizer is not None:
        data = stored(TOKENIZERS, cfg.data.tokenizer)
        if data is None:
            raise StoreError(f"the run's tokenizer {cfg.data.tokenizer[:12]} is not in this machine's store")
        tensors[_TOKENIZER] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return safetensors.torch.save(tensors, metadata={"config": dump_run_config(cfg, "toml")})


def decode_state_payload(
    payload: bytes,
) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, torch.Tensor], bytes | None]:
    """(config, params, outer_state, tokenizer file) from a state payload; MessageError if it is not one.

    Only the format is checked here, and that a tokenizer file is the one the config names by its hash;
    the caller checks names and shapes against the model the config describes, and the parameters
    against the signed state_sha256.
    """
    try:
        tensors = safetensors.torch.load(payload)
        metadata = _metadata(payload)
    except MessageError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, ValueError, ...
        raise MessageError(f"state payload is not a valid safetensors file ({type(e).__name__})") from e
    try:
        cfg = run_config_from_toml(metadata["config"], source="state payload")
    except (KeyError, ConfigError) as e:
        raise MessageError(f"state payload carries no valid run config: {e}") from e
    params, outer = {}, {}
    tokenizer = tensors.pop(_TOKENIZER, None)
    tokenizer_bytes = None if tokenizer is None else tokenizer.numpy().tobytes()
    if (tokenizer_bytes is None) != (cfg.data.tokenizer is None) or (
        tokenizer_bytes is not None and hashlib.sha256(tokenizer_bytes).hexdigest() != cfg.data.tokenizer
    ):
        raise MessageError("state payload's tokenizer file is not the one its config names")
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            raise MessageError(f"state tensor {name!r} is {tensor.dtype}, expected float32")
        if name.startswith(_PARAM):
            params[name[len(_PARAM) :]] = tensor
        elif name.startswith(_OUTER):
            outer[name[len(_OUTER) :]] = tensor
        else:
            raise MessageError(f"state payload has an unexpected tensor {name!r:.80}")
    return cfg, params, outer, tokenizer_bytes


def config_in_head(head: bytes) -> RunConfig | None:
    """The run config a state payload carries, read from its first bytes alone (its first chunk).

    A joiner checks that it can train the run (its task, its architecture) before it downloads the rest.
    None when the safetensors header does not end inside `head`; MessageError when it is not a state's.
    """
    if len(head) < 8:
        return None
    (header_len,) = struct.unpack_from("<Q", head)
    if header_len > len(head) - 8:
        return None
    try:
        header = json.loads(head[8 : 8 + header_len])
    except ValueError as e:
        raise MessageError(f"state payload's header is not JSON: {e}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    text = metadata.get("config") if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise MessageError("state payload carries no run config")
    try:
        return run_config_from_toml(text, source="state payload")
    except ConfigError as e:
        raise MessageError(f"state payload carries no valid run config: {e}") from e


def _metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ map (the header is already known valid: safetensors parsed it)."""
    (header_len,) = struct.unpack_from("<Q", payload)
    if header_len > len(payload) - 8:
        raise MessageError("state payload's safetensors header is longer than the payload")
    header = json.loads(payload[8 : 8 + header_len])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MessageError("state payload has no string metadata")
    return metadata
