"""Corpus loading, the held-out split, and deterministic per-peer batch sampling."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from potluck.training.data import BatchSampler, DataError, builtin_corpus_files, load_corpus, val_batches


def _write_docs(root: Path, count: int, size: int = 500) -> dict[str, bytes]:
    docs = {}
    for i in range(count):
        rel = f"d{i % 3}/doc{i:03d}.txt"
        body = f"# document {i}\n".encode() + bytes([ord("a") + i % 26]) * size
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
        docs[rel] = body
    return docs


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_builtin_files_are_stdlib_python_sources() -> None:
    files = builtin_corpus_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert not any({"site-packages", "test", "tests"} & set(f.parts) for f in files)


def test_builtin_split_is_deterministic_and_capped() -> None:
    a = load_corpus(max_bytes=300_000)
    b = load_corpus(max_bytes=300_000)
    assert a.source == "builtin"
    assert a.train.dtype == np.uint8
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.size + a.val.size <= 300_000
    assert a.val.size == round(300_000 * 0.02)


def test_split_is_by_document_and_disjoint(tmp_path: Path) -> None:
    docs = _write_docs(tmp_path, 60)
    corpus = load_corpus(str(tmp_path), val_fraction=0.1)
    train, val = corpus.train.tobytes(), corpus.val.tobytes()
    held_out = {rel for rel, body in docs.items() if body in val}
    trained = {rel for rel, body in docs.items() if body in train}
    assert held_out and trained
    assert held_out.isdisjoint(trained)
    assert held_out | trained == set(docs)
    assert len(train) + len(val) == sum(map(len, docs.values()))


def test_document_side_does_not_depend_on_max_bytes(tmp_path: Path) -> None:
    docs = _write_docs(tmp_path, 60)
    full = load_corpus(str(tmp_path), val_fraction=0.1).val.tobytes()
    capped = load_corpus(str(tmp_path), val_fraction=0.1, max_bytes=5_000)
    assert capped.train.size + capped.val.size <= 5_000
    for body in docs.values():
        if body in capped.train.tobytes():
            assert body not in full


def test_single_file_is_split_by_position(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(32, 127)) * 100)
    corpus = load_corpus(str(path), val_fraction=0.1)
    assert corpus.source == str(path)
    assert corpus.val.size == 950
    assert (corpus.train.tobytes() + corpus.val.tobytes()) == path.read_bytes()
    capped = load_corpus(str(path), max_bytes=1_000)
    assert capped.train.size + capped.val.size == 1_000


def test_directory_skips_binary_hidden_and_empty_files(tmp_path: Path) -> None:
    _write_docs(tmp_path, 5)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / ".hidden.txt").write_bytes(b"secret" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    corpus = load_corpus(str(tmp_path))
    everything = corpus.train.tobytes() + corpus.val.tobytes()
    assert b"\x00" not in everything and b"secret" not in everything


def test_data_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_corpus(str(tmp_path / "missing"))
    assert "does not exist" in _one_line(exc)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as exc:
        load_corpus(str(tmp_path / "empty"))
    assert "no non-empty text files" in _one_line(exc)

    (tmp_path / "blob.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError) as exc:
        load_corpus(str(tmp_path / "blob.bin"))
    assert "not a text file" in _one_line(exc)

    (tmp_path / "one.txt").write_bytes(b"x")
    with pytest.raises(DataError) as exc:
        load_corpus(str(tmp_path / "one.txt"))
    _one_line(exc)

    tokens = np.zeros(20, dtype=np.uint8)
    with pytest.raises(DataError) as exc:
        BatchSampler(tokens, batch_size=2, block_size=32, shard=0, num_shards=1, seed=0)
    assert "block_size 32" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        val_batches(tokens, batch_size=2, block_size=32, num_batches=1)
    assert "block_size 32" in _one_line(exc)


def test_hf_source_without_datasets_is_a_clear_error(tmp_path: Path) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            load_corpus(f"hf:{tmp_path}")
    else:
        pytest.skip("datasets is installed")


def test_sampler_is_a_pure_function_of_seed_shard_and_call_count() -> None:
    tokens = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    kwargs = dict(batch_size=4, block_size=16, num_shards=2, shard=1)
    a = BatchSampler(tokens, seed=3, **kwargs)
    b = BatchSampler(tokens, seed=3, **kwargs)
    first = [a.next_batch() for _ in range(3)]
    for x, y in first:
        bx, by = b.next_batch()
        assert torch.equal(x, bx) and torch.equal(y, by)
    resumed = BatchSampler(tokens, seed=3, start=2, **kwargs).next_batch()
    assert torch.equal(resumed[0], first[2][0])
    other_seed = BatchSampler(tokens, seed=4, **kwargs).next_batch()
    assert not torch.equal(other_seed[0], first[0][0])


def test_y_is_x_shifted_by_one() -> None:
    tokens = (np.arange(5_000) % 251).astype(np.uint8)  # position is recoverable from a value pair
    x, y = BatchSampler(tokens, batch_size=8, block_size=32, shard=0, num_shards=1, seed=0).next_batch()
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (8, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 251, y)


def test_shards_draw_from_disjoint_ranges() -> None:
    num_shards, shard_len = 3, 1_000
    tokens = np.repeat(np.arange(num_shards, dtype=np.uint8), shard_len)  # shard s holds only value s
    for shard in range(num_shards):
        sampler = BatchSampler(tokens, batch_size=16, block_size=64, shard=shard, num_shards=num_shards, seed=0)
        assert sampler.bounds == (shard * shard_len, (shard + 1) * shard_len)
        for _ in range(20):
            x, y = sampler.next_batch()
            assert torch.all(x == shard) and torch.all(y == shard)


def test_val_batches_are_fixed_and_evenly_spaced() -> None:
    tokens = (np.arange(10_000) % 256).astype(np.uint8)
    a = val_batches(tokens, batch_size=4, block_size=32, num_batches=3)
    b = val_batches(tokens, batch_size=4, block_size=32, num_batches=3)
    assert len(a) == 3
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    x, y = a[0]
    assert x.shape == y.shape == (4, 32)
    assert x[0, 0] == 0  # first window at the start, last window ends at the last token
    assert a[-1][1][-1, -1] == tokens[-1]


class _FakeDataset:
    """Just enough of ``datasets.Dataset`` for the loader: rows, columns and their types, select."""

    def __init__(self, texts: list[str], column: str = "text") -> None:
        self.rows = [{column: t} for t in texts]
        self.column_names = [column]
        self.features = {column: types.SimpleNamespace(dtype="string")}

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, str]]:
        return iter(self.rows)

    def select(self, indices: list[int]) -> _FakeDataset:
        return _FakeDataset([self.rows[i]["text"] for i in indices])


class _FakeDatasetDict(dict):
    pass


def test_hf_source_reads_the_text_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = {
        "plain": _FakeDataset([f"row {i} " + "x" * 50 for i in range(200)]),
        "splits": _FakeDatasetDict(train=_FakeDataset(["train text"] * 5), validation=_FakeDataset(["held out"])),
        "no_text": _FakeDataset(["a"], column="content"),
    }
    for name in saved:
        (tmp_path / name).mkdir()
    fake = types.SimpleNamespace(DatasetDict=_FakeDatasetDict, load_from_disk=lambda path: saved[Path(path).name])
    monkeypatch.setitem(sys.modules, "datasets", fake)

    plain = load_corpus(f"hf:{tmp_path / 'plain'}", val_fraction=0.1)
    assert plain.train.size + plain.val.size == sum(len(row["text"]) + 1 for row in saved["plain"])
    assert set(plain.val.tobytes().split(b"\n")[:-1]).isdisjoint(plain.train.tobytes().split(b"\n"))

    splits = load_corpus(f"hf:{tmp_path / 'splits'}")
    assert splits.train.tobytes() == b"train text\n" * 5 and splits.val.tobytes() == b"held out\n"

    with pytest.raises(DataError, match="needs a 'text' column"):
        load_corpus(f"hf:{tmp_path / 'no_text'}")
    with pytest.raises(DataError, match="no saved dataset"):
        load_corpus(f"hf:{tmp_path / 'missing'}")
