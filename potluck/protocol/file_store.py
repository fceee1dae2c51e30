"""Files a run names by content: kept on this machine under their sha256 and read back only by it.

A run's config cannot hold a tokenizer (megabytes) or the weights it starts from (gigabytes); it holds their
sha256. The file sits in this machine's store, `$POTLUCK_CACHE/<kind>/<sha256>` (`~/.cache/potluck` by
default), put there when the run is loaded from a local file or when a node receives it with the run's state,
and found again by that hash. Small files are kept from memory (`store`), large ones copied in chunks
(`store_file`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from potluck.errors import PotluckError

MAX_STORED_BYTES = 64 * 2**20  # a tokenizer.json of a large vocabulary is a few megabytes
TOKENIZERS = "tokenizers"  # the kind of a run's tokenizer.json files
WEIGHTS = "weights"  # the kind of the safetensors files a run's model starts from (task.init_from)
_CHUNK_BYTES = 2**24  # copy and hash large files 16 MiB at a time, never whole in memory


class StoreError(PotluckError):
    """A file the run names by its hash is missing here, too large, or not what its name says."""


def cache_dir() -> Path:
    """Where this machine keeps what runs name by content ($POTLUCK_CACHE, or ~/.cache/potluck)."""
    return Path(os.environ.get("POTLUCK_CACHE") or Path.home() / ".cache" / "potluck").expanduser()


def store(kind: str, data: bytes) -> str:
    """Keep `data` as a `kind` (e.g. "tokenizers"); its sha256, the name a run gives it."""
    if len(data) > MAX_STORED_BYTES:
        raise StoreError(f"a {kind[:-1]} of {len(data)} bytes is over the {MAX_STORED_BYTES}-byte limit")
    sha = hashlib.sha256(data).hexdigest()
    path = cache_dir() / kind / sha
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{sha}.{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(path)
    return sha


def stored(kind: str, sha: str) -> bytes | None:
    """The `kind` whose sha256 is `sha`, if this machine has it (a file that does not hash to its name is not)."""
    path = cache_dir() / kind / sha
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


def store_file(kind: str, source: Path) -> str:
    """Keep a copy of the file at `source` as a `kind`, read in chunks (no size limit); its sha256.

    A file the store already holds intact is not written again: a run's config is loaded at every start.
    """
    folder = cache_dir() / kind
    sha = file_sha256(source)
    if (folder / sha).is_file() and file_sha256(folder / sha) == sha:
        return sha
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"copy.{os.getpid()}.partial"
    digest = hashlib.sha256()
    with source.open("rb") as reader, partial.open("wb") as writer:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
    sha = digest.hexdigest()
    partial.replace(folder / sha)
    return sha


def keep_file(kind: str, path: Path) -> str:
    """Move the finished file at `path` (on the store's disk) into the store as a `kind`; its sha256."""
    sha = file_sha256(path)
    folder = cache_dir() / kind
    folder.mkdir(parents=True, exist_ok=True)
    path.replace(folder / sha)
    return sha


def file_sha256(path: Path) -> str:
    """The sha256 hex of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stored_file(kind: str, sha: str) -> Path:
    """The path of the stored `kind` named `sha`, checked to hash to its name; StoreError if missing or changed."""
    path = cache_dir() / kind / sha
    try:
        found = file_sha256(path)
    except FileNotFoundError:
        raise StoreError(f"this machine holds no {kind[:-1]} {sha[:12]} in {path.parent}") from None
    if found != sha:
        raise StoreError(f"{path} changed since it was stored: it hashes to {found[:12]}, not {sha[:12]}")
    return path
