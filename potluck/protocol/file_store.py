"""Files a run names by content: kept on this machine under their sha256 and read back only by it.

A run's config cannot hold a tokenizer (megabytes); it holds its sha256. The file sits in this machine's
store, `$POTLUCK_CACHE/<kind>/<sha256>` (`~/.cache/potluck` by default), put there when the run is loaded
from a local file or when a node receives it with the run's state, and found again by that hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from potluck.errors import PotluckError

MAX_STORED_BYTES = 64 * 2**20  # a tokenizer.json of a large vocabulary is a few megabytes
TOKENIZERS = "tokenizers"  # the kind of a run's tokenizer.json files


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
