"""The aggregator's durable state in ``--state-dir``: a per-round checkpoint and a spool of accepted updates.

After each round the aggregator saves a `Checkpoint` (master parameters, outer momentum, its
error-feedback residual, round, version and the aggregate it is about to publish) *before*
publishing, so a restart never serves an aggregate it has no state for. Within an open round each
accepted update is spooled to disk before the peer hears "accepted", so a restart loses none.

Layout::

    DIR/checkpoint.safetensors              tensors param/*, outer/*, residual/*, aggregate (uint8);
                                            metadata: format, round, version, config_hash, content_sha256,
                                            and density (absent in checkpoints from before it existed)
    DIR/spool/round-<n>/<64-hex key>.update 8-byte big-endian envelope length + envelope + payload

Every file is written atomically (temp file in the same directory, fsync, rename, fsync the
directory), so a crash leaves the previous file whole. ``content_sha256`` covers every tensor and
every other metadata field, so a flipped bit anywhere is caught on load rather than trained on.
"""

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from potluck.errors import PotluckError
from potluck.protocol.identity import public_key_to_hex
from potluck.training.diloco import state_sha256

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
_FORMAT = "potluck-checkpoint/v1"
_PREFIXES = ("param/", "outer/", "residual/")
_AGGREGATE = "aggregate"
_SHA_DOMAIN = b"potluck/checkpoint-sha256/v1\0"
_LENGTH_BYTES = 8  # the spool file's big-endian envelope-length prefix
_SPOOL_FILE = re.compile(r"[0-9a-f]{64}\.update")
_ROUND_DIR = re.compile(r"round-(0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class CheckpointError(PotluckError):
    """The state dir cannot be used; the one-line message names the file and what to do."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    """The aggregator's state between rounds; tensors are fp32 and saved from (and loaded to) the CPU."""

    round: int  # the round now open: rounds 0..round-1 are closed
    version: int  # master state version
    params: dict[str, torch.Tensor]  # master parameters
    outer_state: dict[str, torch.Tensor]  # OuterOptimizer.state_dict() (empty before the first Nesterov step)
    residual: dict[str, torch.Tensor]  # the aggregator's error-feedback residual (may be empty)
    last_aggregate: bytes | None  # the published aggregate of round - 1, as sent; None before round 1
    config_hash: str  # the run this state belongs to
    density: float | None = None  # the open round's upload density (protocol/density.py); None: the config's

    def __post_init__(self) -> None:
        for name in ("round", "version"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Checkpoint.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.config_hash, str) or not self.config_hash:
            raise ValueError(f"Checkpoint.config_hash must be a non-empty str, got {self.config_hash!r:.80}")
        if self.last_aggregate is not None and not isinstance(self.last_aggregate, bytes):
            raise ValueError(f"Checkpoint.last_aggregate must be bytes or None, got {type(self.last_aggregate)}")
        for field in ("params", "outer_state", "residual"):
            for name, t in getattr(self, field).items():
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                    raise ValueError(f"Checkpoint.{field}[{name!r}] must be a float32 tensor, got {t!r:.80}")


def _show(path: Path) -> str:
    """The path as one shell-pasteable token, line breaks escaped to keep messages one line."""
    return shlex.quote(str(path).replace("\r", "\\r").replace("\n", "\\n"))


def _fsync_dir(directory: Path) -> None:
    """Flush a rename or a new entry to disk; POSIX only (Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Create `directory` and missing parents, fsyncing each parent so the new entries survive a crash."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new_dir in reversed(missing):
        new_dir.mkdir(exist_ok=True)
        _fsync_dir(new_dir.parent)


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Replace `path` with `data`: temp file in the same directory, fsync, rename, fsync the directory."""
    _make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]  # os.write may write less than asked
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _content_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over every tensor (see `state_sha256`) and every metadata field but the checksum itself."""
    fields = {k: v for k, v in metadata.items() if k != "content_sha256"}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return hashlib.sha256(_SHA_DOMAIN + state_sha256(tensors) + text).hexdigest()


def save_checkpoint(state_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` to ``state_dir/checkpoint.safetensors`` atomically and return that path.

    Temp files left by an earlier crash are removed first. On any failure the previous checkpoint is
    left whole; a full disk becomes a CheckpointError that says to free space.
    """
    state_dir = Path(state_dir)
    path = state_dir / CHECKPOINT_NAME
    tensors: dict[str, torch.Tensor] = {}
    for prefix, part in zip(_PREFIXES, (checkpoint.params, checkpoint.outer_state, checkpoint.residual), strict=True):
        tensors.update({prefix + name: t.detach().to("cpu").contiguous() for name, t in part.items()})
    if checkpoint.last_aggregate is not None:
        # frombuffer warns on read-only bytes (hence the bytearray copy) and refuses an empty buffer
        aggregate = bytearray(checkpoint.last_aggregate)
        tensors[_AGGREGATE] = (
            torch.frombuffer(aggregate, dtype=torch.uint8) if aggregate else torch.empty(0, dtype=torch.uint8)
        )
    metadata = {
        "format": _FORMAT,
        "round": str(checkpoint.round),
        "version": str(checkpoint.version),
        "config_hash": checkpoint.config_hash,
    }
    if checkpoint.density is not None:
        metadata["density"] = repr(checkpoint.density)
    metadata["content_sha256"] = _content_sha256(tensors, metadata)
    data = safetensors.torch.save(tensors, metadata=metadata)
    try:
        for stale in state_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
            stale.unlink(missing_ok=True)
        _write_atomically(path, data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"cannot write checkpoint {_show(path)}: disk full ({len(data)} bytes needed); "
                "free space or use another --state-dir"
            ) from e
        raise CheckpointError(
            f"cannot write checkpoint {_show(path)} ({e.strerror or e}); check that --state-dir is writable"
        ) from e
    return path


def load_checkpoint(state_dir: Path, *, config_hash: str) -> Checkpoint | None:
    """Read ``state_dir/checkpoint.safetensors``; None when there is none.

    Raises CheckpointError when the file is unreadable, truncated, corrupt (checksum, types, fields)
    or belongs to another run (`config_hash` differs): never resume from state we cannot trust.
    """
    path = Path(state_dir) / CHECKPOINT_NAME
    if not os.path.lexists(path):
        return None
    fix = "move it away to start the run from round 0, or restore a good copy"
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError) as e:
        reason = " ".join(str(e).split())
        raise CheckpointError(f"checkpoint {_show(path)} is unreadable, truncated or corrupt ({reason}); {fix}") from e

    def corrupt(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {_show(path)} is corrupt ({problem}); {fix}")

    if metadata.get("format") != _FORMAT:
        raise corrupt(f"format {metadata.get('format')!r:.40}, expected {_FORMAT!r}")
    if set(metadata) - {"density"} != {"format", "round", "version", "config_hash", "content_sha256"}:
        raise corrupt(f"metadata fields {sorted(metadata)}")
    if metadata["content_sha256"] != _content_sha256(tensors, metadata):
        raise corrupt("checksum mismatch")
    for name in ("round", "version"):
        if not _DECIMAL.fullmatch(metadata[name]):
            raise corrupt(f"{name} {metadata[name]!r:.40} is not a decimal integer")
    density = None
    if "density" in metadata:
        try:
            density = float(metadata["density"])
        except ValueError:
            density = -1.0
        if not 0.0 <= density <= 1.0:
            raise corrupt(f"density {metadata['density']!r:.40} is not a number in [0, 1]")
    if metadata["config_hash"] != config_hash:
        raise CheckpointError(
            f"checkpoint {_show(path)} belongs to run {metadata['config_hash'][:12]}, not to this run "
            f"{config_hash[:12]}; pass this run's --state-dir, or move the checkpoint away to start fresh"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in _PREFIXES}
    last_aggregate = None
    for name, t in tensors.items():
        if name == _AGGREGATE:
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise corrupt(f"aggregate is {t.dtype} with {t.dim()} dims, expected 1-D uint8")
            last_aggregate = t.numpy().tobytes()
            continue
        prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
        if prefix is None:
            raise corrupt(f"unexpected tensor {name!r:.80}")
        if t.dtype != torch.float32:
            raise corrupt(f"tensor {name!r:.80} is {t.dtype}, expected float32")
        parts[prefix][name.removeprefix(prefix)] = t
    return Checkpoint(
        round=int(metadata["round"]),
        version=int(metadata["version"]),
        params=parts["param/"],
        outer_state=parts["outer/"],
        residual=parts["residual/"],
        last_aggregate=last_aggregate,
        config_hash=metadata["config_hash"],
        density=density,
    )


def _round_dir(state_dir: Path, round: int) -> Path:
    if type(round) is not int or round < 0:
        raise ValueError(f"round must be an int >= 0, got {round!r}")
    return Path(state_dir) / "spool" / f"round-{round}"


def spool_update(state_dir: Path, *, round: int, public_key: bytes, envelope: bytes, payload: bytes) -> None:
    """Durably store one accepted update of the open `round`; call it before telling the peer "accepted".

    One file per peer: a later update from the same key replaces the earlier one. A full disk raises
    CheckpointError, so the caller can refuse the update instead of acknowledging one it may lose.
    """
    path = _round_dir(state_dir, round) / f"{public_key_to_hex(public_key)}.update"
    try:
        _write_atomically(path, len(envelope).to_bytes(_LENGTH_BYTES, "big") + envelope + payload)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "disk full; free space or use another --state-dir" if full else "check that --state-dir is writable"
        raise CheckpointError(f"cannot spool update to {_show(path)} ({e.strerror or e}); {fix}") from e


def _read_spool_file(path: Path, *, max_bytes: int) -> tuple[bytes, bytes] | str:
    """The file's (envelope, payload), or why it was skipped. The size is checked before anything is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"
        if info.st_size > _LENGTH_BYTES + max_bytes:
            return f"is {info.st_size} bytes, over the {max_bytes}-byte limit plus the {_LENGTH_BYTES}-byte prefix"
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(info.st_size + 1)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    finally:
        os.close(fd)
    if len(data) != info.st_size or len(data) < _LENGTH_BYTES:
        return "is truncated or changed while being read"
    envelope_bytes = int.from_bytes(data[:_LENGTH_BYTES], "big")
    if envelope_bytes > len(data) - _LENGTH_BYTES:
        return f"claims a {envelope_bytes}-byte envelope but holds {len(data) - _LENGTH_BYTES} bytes"
    return data[_LENGTH_BYTES : _LENGTH_BYTES + envelope_bytes], data[_LENGTH_BYTES + envelope_bytes :]


def load_spool(state_dir: Path, *, round: int, max_bytes: int) -> list[tuple[bytes, bytes]]:
    """The (envelope, payload) pairs spooled for `round`, sorted by public key.

    `max_bytes` bounds ``len(envelope) + len(payload)``. Unreadable, oversize or malformed files are
    skipped with a warning rather than failing: each update is re-verified by the caller anyway.
    """
    directory = _round_dir(state_dir, round)
    if not directory.is_dir():
        return []
    updates = []
    for path in sorted(directory.iterdir()):
        if not _SPOOL_FILE.fullmatch(path.name):
            continue  # a temp file of a write that crashed: it was never acknowledged
        result = _read_spool_file(path, max_bytes=max_bytes)
        if isinstance(result, str):
            logger.warning("skipping spooled update %s: it %s", _show(path), result)
            continue
        updates.append(result)
    return updates


def prune_spool(state_dir: Path, *, before_round: int) -> None:
    """Delete the spool directories of rounds before `before_round` (call it once their checkpoint is saved)."""
    spool = Path(state_dir) / "spool"
    if not spool.is_dir():
        return
    for directory in spool.iterdir():
        match = _ROUND_DIR.fullmatch(directory.name)
        if match and int(match.group(1)) < before_round and directory.is_dir() and not directory.is_symlink():
            shutil.rmtree(directory)
    _fsync_dir(spool)
