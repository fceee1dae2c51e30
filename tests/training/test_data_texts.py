"""`iter_texts`: the documents' plain text of every data source, for training a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from potluck.training.data import DataError, builtin_corpus_files, iter_texts


def _one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_a_directory_gives_each_text_file_once_in_the_corpus_order(tmp_path: Path) -> None:
    # Prepare
    bodies = {f"d{i % 2}/doc{i}.txt": f"document {i} é\n" for i in range(6)}
    for rel, body in bodies.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    (tmp_path / ".hidden").write_text("secret\n")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    # Execute
    texts = list(iter_texts(str(tmp_path)))
    # Assert
    assert sorted(texts) == sorted(bodies.values())
    assert texts == list(iter_texts(str(tmp_path)))


def test_a_large_file_comes_in_pieces_that_join_to_the_whole(tmp_path: Path) -> None:
    body = "".join(f"line {i} ünïcödé 😀\n" for i in range(150_000))  # about 4 MiB
    path = tmp_path / "big.txt"
    path.write_text(body)

    pieces = list(iter_texts(str(path)))

    assert len(pieces) > 2
    assert "".join(pieces) == body
    assert all(piece.endswith("\n") for piece in pieces)


def test_max_bytes_bounds_the_text_in_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("abc\n" * 1000)

    texts = list(iter_texts(str(path), max_bytes=10))

    assert "".join(texts) == "abc\nabc\nab"
    assert sum(len(t.encode()) for t in iter_texts("builtin", max_bytes=100_000)) == 100_000


def test_builtin_is_the_standard_librarys_sources() -> None:
    first = next(iter_texts("builtin"))

    assert first and any(f.read_text(errors="replace").startswith(first[:200]) for f in builtin_corpus_files())


def test_jsonl_records_give_their_named_field(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"body": "first", "id": 1}, {"body": None}, {"body": ""}, {"body": "second ✓"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    assert list(iter_texts(str(path), field="body")) == ["first", "second ✓"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [("{broken", ":2 is not JSON"), ('{"other": "x"}', "no 'text' field"), ('{"text": 3}', "int, not text")],
)
def test_a_bad_jsonl_line_is_named(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")

    with pytest.raises(DataError) as exc:
        list(iter_texts(str(path)))
    assert expected in _one_line(exc)


def test_parquet_gives_its_named_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": ["one", None, "two", ""], "n": [1, 2, 3, 4]}), path)

    assert list(iter_texts(str(path), field="content")) == ["one", "two"]
    with pytest.raises(DataError) as missing:
        iter_texts(str(path))
    with pytest.raises(DataError) as numbers:
        iter_texts(str(path), field="n")
    assert "'text' column" in _one_line(missing) and "not text" in _one_line(numbers)


def test_a_saved_dataset_gives_its_train_rows(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    splits = {"train": ["a", "b", ""], "validation": ["held out"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "ds")
    )

    assert list(iter_texts(f"hf:{tmp_path / 'ds'}")) == ["a", "b"]
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(DataError) as numbers:
        iter_texts(f"hf:{tmp_path / 'numbers'}")
    assert "not text" in _one_line(numbers)


def test_a_missing_or_binary_source_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\0\1")
    (tmp_path / "empty").mkdir()

    for source, expected in [
        (str(tmp_path / "nope"), "does not exist"),
        (str(binary), "not a text file"),
        (str(tmp_path / "empty"), "no non-empty text files"),
    ]:
        with pytest.raises(DataError) as exc:
            iter_texts(source)
        assert expected in _one_line(exc)
