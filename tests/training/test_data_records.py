""".jsonl and .parquet files as a run's corpus, whole sources beside a separate held-out source, and bad records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from potluck.training import sources
from potluck.training.data import DataError, load_corpus, load_source
from potluck.training.sources import split_records


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def _write_jsonl(path: Path, texts: list[str], *, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def _write_parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path)
    return path


def _records(tokens: np.ndarray) -> list[bytes]:
    return tokens.tobytes().split(b"\n")[:-1]


TEXTS = [f"record {i} ünï " + "x" * (i % 7) for i in range(300)]


def test_jsonl_records_are_split_by_record_deterministically(tmp_path: Path) -> None:
    # Prepare
    path = _write_jsonl(tmp_path / "rows.jsonl", TEXTS, field="body")
    # Execute
    corpus = load_corpus(str(path), val_fraction=0.1, field="body")
    again = load_corpus(str(path), val_fraction=0.1, field="body")
    # Assert: whole records on each side, none on both, every one somewhere, the same each time
    train, val = _records(corpus.train), _records(corpus.val)
    assert val and train and set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(t.encode() for t in TEXTS)
    assert 0.05 < len(val) / len(TEXTS) < 0.15
    assert np.array_equal(corpus.train, again.train) and np.array_equal(corpus.val, again.val)


def test_parquet_rows_of_the_named_column_are_split_like_jsonl_records(tmp_path: Path) -> None:
    jsonl = load_corpus(str(_write_jsonl(tmp_path / "rows.jsonl", TEXTS)), val_fraction=0.1)
    path = _write_parquet(tmp_path / "rows.parquet", {"content": TEXTS, "n": list(range(len(TEXTS)))})

    parquet = load_corpus(str(path), val_fraction=0.1, field="content")

    assert parquet.train.tobytes() == jsonl.train.tobytes() and parquet.val.tobytes() == jsonl.val.tobytes()


def test_max_bytes_caps_each_side_and_never_moves_a_record(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", TEXTS)
    full = load_corpus(str(path), val_fraction=0.1)

    capped = load_corpus(str(path), val_fraction=0.1, max_bytes=2_000)

    assert capped.train.size + capped.val.size == 2_000
    assert capped.val.size == 200
    assert set(_records(capped.train)) <= set(_records(full.train))
    assert set(_records(capped.val)) <= set(_records(full.val))


def test_a_capped_read_stops_once_both_sides_are_full() -> None:
    # Prepare: an endless stream of records stands for a file too big to read whole
    def endless() -> Iterator[str]:
        i = 0
        while True:
            yield f"record {i}"
            i += 1

    # Execute
    train, val = split_records(endless(), val_fraction=0.1, max_bytes=10_000)
    # Assert
    assert (train.size, val.size) == (9_000, 1_000)


def test_a_capped_jsonl_file_is_read_only_as_far_as_the_cap(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", TEXTS)
    with path.open("a") as f:
        f.write("{broken\n")

    corpus = load_corpus(str(path), val_fraction=0.1, max_bytes=1_000)

    assert corpus.train.size + corpus.val.size == 1_000


def test_a_single_record_is_too_small_to_split(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "one.jsonl", ["only one"])

    with pytest.raises(DataError) as exc:
        load_corpus(str(path))

    assert "too small" in _one_line(exc)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{broken", "rows.jsonl:3 is not JSON"),
        ("[" * 100_000 + "]" * 100_000, "rows.jsonl:3 is not JSON (nested too deep)"),
        ('{"body": "x"}', "rows.jsonl:3 has no 'text' field (it has ['body'])"),
        ('"just a string"', "rows.jsonl:3 has no 'text' field (it has str)"),
        ('{"text": 3}', "rows.jsonl:3: field 'text' is int, not text"),
        ('{"text": ["a", "b"]}', "rows.jsonl:3: field 'text' is list, not text"),
        ('{"text": ' + "9" * 5000 + "}", "rows.jsonl:3 is not JSON (Exceeds the limit"),
    ],
)
def test_a_bad_jsonl_line_is_one_line_naming_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")

    with pytest.raises(DataError) as exc:
        load_corpus(str(path))

    assert expected in _one_line(exc)


def test_a_jsonl_line_too_long_to_be_a_record_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_LINE_CHARS", 100)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "x" * 88}) + "\n" + "y" * 10_000)  # a line of 100 characters, then no end

    with pytest.raises(DataError) as exc:
        load_corpus(str(path))

    assert "rows.jsonl:2 is over 100 characters" in _one_line(exc)


def test_a_bad_parquet_file_is_one_line_naming_file_and_column(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "rows.parquet", {"content": ["a", "b"], "n": [1, 2]})
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all" * 10)

    cases = [
        (str(path), "text", "rows.parquet has columns ['content', 'n']; it needs a 'text' column"),
        (str(path), "n", "rows.parquet: column 'n' holds int64, not text"),
        (str(tmp_path / "fake.parquet"), "text", "cannot read"),
    ]
    for source, field, expected in cases:
        with pytest.raises(DataError) as exc:
            load_corpus(source, field=field)
        assert expected in _one_line(exc)


def test_a_whole_source_reads_every_document_up_to_the_cap(tmp_path: Path) -> None:
    # Prepare
    jsonl = _write_jsonl(tmp_path / "rows.jsonl", TEXTS)
    book = tmp_path / "book.txt"
    book.write_text("a line of text\n" * 100)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"document {i}\n")
    # Execute
    records, text, docs = (load_source(str(p)) for p in (jsonl, book, folder))
    # Assert: nothing is held out
    assert _records(records) == [t.encode() for t in TEXTS]
    assert text.tobytes() == book.read_bytes()
    assert sorted(_records(docs)) == [f"document {i}".encode() for i in range(5)]
    assert load_source(str(jsonl), max_bytes=50).tobytes() == "\n".join(TEXTS).encode()[:50]
    with pytest.raises(DataError) as exc:
        load_source(str(tmp_path / "missing.jsonl"))
    assert "does not exist" in _one_line(exc)


def test_a_saved_dataset_read_whole_gives_its_held_out_split_as_held_out_text(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    splits = {"train": ["a", "b"], "validation": ["held out"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "ds")
    )

    assert load_source(f"hf:{tmp_path / 'ds'}", field="body").tobytes() == b"a\nb\n"
    assert load_source(f"hf:{tmp_path / 'ds'}", field="body", held_out=True).tobytes() == b"held out\n"
    with pytest.raises(DataError) as exc:
        load_corpus(f"hf:{tmp_path / 'ds'}")
    assert "needs a 'text' column" in _one_line(exc)


def test_a_lone_surrogate_that_json_can_spell_is_replaced_not_a_crash(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", ["plain"] * 20)
    with path.open("a") as f:
        f.write('{"text": "a\\ud800b"}\n')

    records = _records(load_source(str(path)))

    assert records[-1] == b"a?b"
