"""Tests for potluck.aggregator_server.checkpoint: the aggregator's checkpoint and update spool on disk."""

import dataclasses
import errno
import logging
import os
from pathlib import Path

import pytest
import torch

import potluck.aggregator_server.checkpoint as ckpt
from potluck.aggregator_server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_spool,
    prune_spool,
    save_checkpoint,
    spool_update,
)

CONFIG_HASH = "ab" * 32


def _checkpoint(*, round: int = 3, seed: int = 0, empty: bool = False, aggregate: bytes | None = b"agg") -> Checkpoint:
    gen = torch.Generator().manual_seed(seed)
    params = {"wte.weight": torch.randn(5, 4, generator=gen), "ln.bias": torch.randn(4, generator=gen)}
    return Checkpoint(
        round=round,
        version=round + 1,
        params=params,
        outer_state={} if empty else {name: torch.randn(p.shape, generator=gen) for name, p in params.items()},
        residual={} if empty else {"wte.weight": torch.randn(5, 4, generator=gen)},
        last_aggregate=aggregate,
        config_hash=CONFIG_HASH,
    )


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert (a.round, a.version, a.last_aggregate, a.config_hash) == (
        b.round,
        b.version,
        b.last_aggregate,
        b.config_hash,
    )
    for field in ("params", "outer_state", "residual"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys()
        for name in x:
            assert y[name].dtype == torch.float32 and torch.equal(x[name], y[name])  # bit-exact


@pytest.mark.parametrize(
    ("empty", "aggregate"), [(False, b"agg"), (True, None), (False, b""), (True, bytes(range(256)) * 10)]
)
def test_checkpoint_round_trips_bit_exact(tmp_path: Path, empty: bool, aggregate: bytes | None) -> None:
    # Prepare
    original = _checkpoint(empty=empty, aggregate=aggregate)
    # Execute
    path = save_checkpoint(tmp_path, original)
    loaded = load_checkpoint(tmp_path, config_hash=CONFIG_HASH)
    # Assert
    assert path == tmp_path / CHECKPOINT_NAME
    assert loaded is not None
    _assert_same(original, loaded)


def test_the_open_rounds_density_is_kept_and_a_checkpoint_from_before_densities_loads_without_one(
    tmp_path: Path,
) -> None:
    save_checkpoint(tmp_path / "new", dataclasses.replace(_checkpoint(), density=0.125))
    save_checkpoint(tmp_path / "old", _checkpoint())  # density None: no metadata field, as before it existed

    new = load_checkpoint(tmp_path / "new", config_hash=CONFIG_HASH)
    old = load_checkpoint(tmp_path / "old", config_hash=CONFIG_HASH)

    assert new is not None and new.density == 0.125
    assert old is not None and old.density is None


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "does-not-exist", config_hash=CONFIG_HASH) is None
    assert load_checkpoint(tmp_path, config_hash=CONFIG_HASH) is None


def test_save_creates_the_state_dir_and_replaces_the_old_checkpoint(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "b"
    save_checkpoint(state_dir, _checkpoint(round=1, seed=1))
    save_checkpoint(state_dir, _checkpoint(round=2, seed=2))
    loaded = load_checkpoint(state_dir, config_hash=CONFIG_HASH)
    assert loaded is not None
    _assert_same(loaded, _checkpoint(round=2, seed=2))
    assert sorted(p.name for p in state_dir.iterdir()) == [CHECKPOINT_NAME]


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_last_bit(data: bytes) -> bytes:  # the last byte is tensor data: only the checksum can notice
    return data[:-1] + bytes([data[-1] ^ 1])


def _flip_round_digit(data: bytes) -> bytes:  # still parses, still a valid round: only the checksum can notice
    return data.replace(b'"round":"3"', b'"round":"7"')


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_last_bit, _flip_round_digit, lambda d: b"", lambda d: b"garbage" * 100, lambda d: d[:-1]],
    ids=["truncated", "bit-flip", "metadata-edit", "empty", "garbage", "one-byte-short"],
)
def test_damaged_checkpoint_raises_naming_the_file(tmp_path: Path, damage) -> None:
    # Prepare
    path = save_checkpoint(tmp_path, _checkpoint())
    damaged = damage(path.read_bytes())
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=CHECKPOINT_NAME) as info:
        load_checkpoint(tmp_path, config_hash=CONFIG_HASH)
    assert "\n" not in str(info.value) and "move it away" in str(info.value)


def _rewrite(path: Path, *, tensors: dict[str, torch.Tensor] | None = None, **metadata: str) -> None:
    """Rewrite a saved checkpoint with edited tensors or metadata and a recomputed (valid) checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as file:
        meta = {**file.metadata(), **metadata}
        old = {name: file.get_tensor(name) for name in file.keys()}
    tensors = old if tensors is None else tensors
    meta["content_sha256"] = ckpt._content_sha256(tensors, meta)
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"round": "-1"}, "round"),
        ({"version": "1.5"}, "version"),
        ({"round": "03"}, "round"),
        ({"format": "potluck-checkpoint/v0"}, "format"),
        ({"extra": "x"}, "metadata fields"),
        ({"density": "nan"}, "density"),
        ({"density": "2.0"}, "density"),
        ({"density": "half"}, "density"),
    ],
)
def test_unparsable_metadata_raises(tmp_path: Path, edit: dict[str, str], problem: str) -> None:
    path = save_checkpoint(tmp_path, _checkpoint())
    _rewrite(path, **edit)
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME} is corrupt .*{problem}"):
        load_checkpoint(tmp_path, config_hash=CONFIG_HASH)


@pytest.mark.parametrize(
    "tensors",
    [
        {"param/w": torch.zeros(2, dtype=torch.float16)},
        {"outer/w": torch.zeros(2, dtype=torch.float64)},
        {"param/w": torch.zeros(2), "aggregate": torch.zeros(2)},
        {"param/w": torch.zeros(2), "aggregate": torch.zeros(2, 2, dtype=torch.uint8)},
        {"junk/w": torch.zeros(2)},
    ],
    ids=["fp16-param", "fp64-outer", "float-aggregate", "2d-aggregate", "unknown-prefix"],
)
def test_wrong_tensor_types_raise(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save_checkpoint(tmp_path, _checkpoint())
    _rewrite(path, tensors=tensors)
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME} is corrupt"):
        load_checkpoint(tmp_path, config_hash=CONFIG_HASH)


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_NAME} belongs to run abababababab.*--state-dir"):
        load_checkpoint(tmp_path, config_hash="cd" * 32)


def test_checkpoint_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="round"):
        Checkpoint(**{**_fields(), "round": -1})
    with pytest.raises(ValueError, match="float32"):
        Checkpoint(**{**_fields(), "params": {"w": torch.zeros(2, dtype=torch.float16)}})
    with pytest.raises(ValueError, match="config_hash"):
        Checkpoint(**{**_fields(), "config_hash": ""})


def _fields() -> dict:
    c = _checkpoint()
    return {name: getattr(c, name) for name in Checkpoint.__slots__}


def test_crash_mid_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    save_checkpoint(tmp_path, _checkpoint(round=1, seed=1))

    def crash(*args: object) -> None:
        raise KeyboardInterrupt  # the process is being killed between write and rename

    monkeypatch.setattr(ckpt.os, "replace", crash)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _checkpoint(round=2, seed=2))
    monkeypatch.undo()
    # Assert
    loaded = load_checkpoint(tmp_path, config_hash=CONFIG_HASH)
    assert loaded is not None
    _assert_same(loaded, _checkpoint(round=1, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_stale_temp_file_from_a_killed_process_is_ignored_then_cleaned(tmp_path: Path) -> None:
    # Prepare: a half-written temp file, as a SIGKILL between write and rename leaves behind
    save_checkpoint(tmp_path, _checkpoint(round=1, seed=1))
    stale = tmp_path / f".{CHECKPOINT_NAME}.0123456789abcdef.tmp"
    stale.write_bytes(b"half a checkpoint")
    # Execute / Assert
    loaded = load_checkpoint(tmp_path, config_hash=CONFIG_HASH)
    assert loaded is not None and loaded.round == 1
    save_checkpoint(tmp_path, _checkpoint(round=2, seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_full_disk_keeps_the_old_checkpoint_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    save_checkpoint(tmp_path, _checkpoint(round=1, seed=1))
    real_write = os.write
    calls = []

    def write_until_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[:100])  # a short write first, as a filling disk gives
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "write", write_until_full)
    # Execute
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, _checkpoint(round=2, seed=2))
    monkeypatch.undo()
    # Assert
    message = str(info.value)
    assert "\n" not in message
    assert CHECKPOINT_NAME in message and "disk full" in message
    assert "free space or use another --state-dir" in message
    assert len(calls) == 2
    loaded = load_checkpoint(tmp_path, config_hash=CONFIG_HASH)
    assert loaded is not None
    _assert_same(loaded, _checkpoint(round=1, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def _key(i: int) -> bytes:
    return bytes([i]) * 32


def test_spool_round_trips_sorted_by_key(tmp_path: Path) -> None:
    # Prepare
    spool_update(tmp_path, round=4, public_key=_key(9), envelope=b"env9", payload=b"payload9")
    spool_update(tmp_path, round=4, public_key=_key(1), envelope=b"", payload=b"p1")
    spool_update(tmp_path, round=4, public_key=_key(5), envelope=b"env5", payload=b"")
    spool_update(tmp_path, round=5, public_key=_key(2), envelope=b"other", payload=b"round")
    spool_update(tmp_path, round=4, public_key=_key(5), envelope=b"env5-again", payload=b"newer")  # replaces
    # Execute
    updates = load_spool(tmp_path, round=4, max_bytes=1000)
    # Assert
    assert updates == [(b"", b"p1"), (b"env5-again", b"newer"), (b"env9", b"payload9")]
    assert load_spool(tmp_path, round=5, max_bytes=1000) == [(b"other", b"round")]
    assert load_spool(tmp_path, round=6, max_bytes=1000) == []
    assert (tmp_path / "spool" / "round-4" / f"{_key(9).hex()}.update").read_bytes() == (
        (4).to_bytes(8, "big") + b"env9payload9"
    )


def test_spool_skips_oversize_and_malformed_files_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    spool_update(tmp_path, round=0, public_key=_key(1), envelope=b"e" * 10, payload=b"p" * 10)  # exactly 20 bytes
    spool_update(tmp_path, round=0, public_key=_key(2), envelope=b"e" * 10, payload=b"p" * 11)  # one over
    directory = tmp_path / "spool" / "round-0"
    (directory / f"{_key(3).hex()}.update").write_bytes(b"\x00\x01")  # shorter than the length prefix
    (directory / f"{_key(4).hex()}.update").write_bytes((99).to_bytes(8, "big") + b"short")  # lies about its length
    (directory / f"{_key(5).hex()}.update").mkdir()  # not a file
    (directory / f".{_key(6).hex()}.update.0123456789abcdef.tmp").write_bytes(b"crashed write")  # never acknowledged
    reads = []
    real_read = ckpt.os.fdopen

    def recording_fdopen(fd: int, *args: object, **kwargs: object):
        reads.append(fd)
        return real_read(fd, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "fdopen", recording_fdopen)
    # Execute
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        updates = load_spool(tmp_path, round=0, max_bytes=20)
    # Assert
    assert updates == [(b"e" * 10, b"p" * 10)]
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 4
    assert any(_key(2).hex() in m and "over the 20-byte limit" in m for m in skipped)
    assert len(reads) == 3  # the oversize file and the directory were never read


def test_spool_write_failure_is_a_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "write", full)
    with pytest.raises(CheckpointError, match="disk full; free space or use another --state-dir"):
        spool_update(tmp_path, round=0, public_key=_key(1), envelope=b"e", payload=b"p")
    monkeypatch.undo()
    assert load_spool(tmp_path, round=0, max_bytes=100) == []
    assert list((tmp_path / "spool" / "round-0").iterdir()) == []


def test_spool_rejects_bad_keys_and_rounds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        spool_update(tmp_path, round=0, public_key=b"short", envelope=b"e", payload=b"p")
    with pytest.raises(ValueError, match="round"):
        spool_update(tmp_path, round=-1, public_key=_key(1), envelope=b"e", payload=b"p")


def test_prune_spool_deletes_only_earlier_rounds(tmp_path: Path) -> None:
    # Prepare
    for round in (0, 1, 2, 10):
        spool_update(tmp_path, round=round, public_key=_key(round), envelope=b"e", payload=b"p")
    (tmp_path / "spool" / "notes").mkdir()  # not ours: left alone
    # Execute
    prune_spool(tmp_path, before_round=2)
    prune_spool(tmp_path / "no-such-dir", before_round=5)  # nothing to prune is fine
    # Assert
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["notes", "round-10", "round-2"]
    assert load_spool(tmp_path, round=1, max_bytes=100) == []
    assert load_spool(tmp_path, round=2, max_bytes=100) == [(b"e", b"p")]


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux writes at most ~2 GiB per call, so a large checkpoint always takes several os.write calls
    real_write = os.write
    monkeypatch.setattr(ckpt.os, "write", lambda fd, data: real_write(fd, data[:100]))
    save_checkpoint(tmp_path, _checkpoint())
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path, config_hash=CONFIG_HASH)
    assert loaded is not None
    _assert_same(loaded, _checkpoint())
