"""The weights a run starts from (`task.init_from`): a safetensors file or a `save_pretrained` directory.

A local run.toml names them by path; loading it keeps one safetensors file in this machine's store and puts
its sha256 in the run's config, so the signed config, every node and every receipt say which weights the run
started from. A single file is kept as it is (its hash is what `sha256sum` prints); a directory's
`model.safetensors` likewise; a sharded directory (`model.safetensors.index.json`) is merged into one file
first. Only the aggregator that creates the run reads them again (potluck.tasks.init_weights); peers receive
the weights with the run's state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from potluck.errors import PotluckError
from potluck.protocol.file_store import WEIGHTS, StoreError, cache_dir, keep_file, store_file, stored_file

SINGLE = "model.safetensors"  # what save_pretrained and potluck export write
INDEX = "model.safetensors.index.json"  # save_pretrained's list of shards, when it cut the model
MAX_INDEX_BYTES = 16 * 2**20  # an index names every tensor once: a few hundred kilobytes for a large model


class WeightsError(PotluckError):
    """A run's init_from names no readable safetensors weights (one line, naming the file)."""


def store_weights(path: Path, *, shown: str) -> str:
    """Keep the weights at `path` (a file or a directory; `shown`: the path as the user wrote it); their sha256."""
    if path.is_dir():
        if (path / INDEX).is_file():
            return _store_shards(path, shown=shown)
        if not (path / SINGLE).is_file():
            raise WeightsError(
                f"{shown} holds no {SINGLE} or {INDEX}; save the model with save_pretrained (safetensors, the "
                "default) or potluck export"
            )
        path, shown = path / SINGLE, f"{shown}/{SINGLE}"
    _check_safetensors(path, shown=shown)
    try:
        return store_file(WEIGHTS, path)
    except OSError as e:
        raise WeightsError(f"cannot keep {shown} in the store {cache_dir()}: {e}") from None


def weights_file(sha: str) -> Path:
    """The stored weights named `sha`, checked against their hash; StoreError with the fix when not here."""
    try:
        return stored_file(WEIGHTS, sha)
    except StoreError as e:
        raise StoreError(
            f"the run starts from weights {sha[:12]} (task.init_from): {e}; create it where they are, loading the "
            "run.toml that names their file (init_from = PATH)"
        ) from None


def _check_safetensors(path: Path, *, shown: str) -> None:
    """Refuse a file that is missing or not safetensors (its header and the size it promises are read)."""
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsError(f"no such file {shown}")
    try:
        with safe_open(str(path), framework="pt") as opened:
            opened.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of bad file
        raise WeightsError(f"{shown} is not a safetensors file: {' '.join(str(e).split())}") from None


def _store_shards(folder: Path, *, shown: str) -> str:
    """Merge a sharded save_pretrained directory into one safetensors file in the store; its sha256."""
    import safetensors.torch
    from safetensors import safe_open

    weight_map = _weight_map(folder, shown=shown)
    tensors: dict[str, Any] = {}
    for name in sorted(set(weight_map.values())):
        _check_safetensors(folder / name, shown=f"{shown}/{name}")
        with safe_open(str(folder / name), framework="pt") as opened:
            tensors.update({key: opened.get_tensor(key) for key in opened.keys() if weight_map.get(key) == name})
    missing = sorted(weight_map.keys() - tensors.keys())
    if missing:
        raise WeightsError(f"{shown}/{INDEX} puts {missing[0]} in {weight_map[missing[0]]}, which does not hold it")
    partial = cache_dir() / WEIGHTS / f"merge.{os.getpid()}.partial"
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(tensors, str(partial), metadata={"format": "pt"})
        return keep_file(WEIGHTS, partial)
    except OSError as e:
        raise WeightsError(f"cannot keep {shown} in the store {cache_dir()}: {e}") from None


def _weight_map(folder: Path, *, shown: str) -> dict[str, str]:
    """The index's tensor -> shard file map, each shard a plain file name inside `folder`."""
    where = f"{shown}/{INDEX}"
    try:
        if (folder / INDEX).stat().st_size > MAX_INDEX_BYTES:
            raise WeightsError(f"{where} is over {MAX_INDEX_BYTES} bytes")
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{where} is not a safetensors index: {' '.join(str(e).split())}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f'{where} has no "weight_map" of tensor names to shard files')
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise WeightsError(f"{where} puts {key} in {name!r}, not a .safetensors file beside the index")
    return weight_map
