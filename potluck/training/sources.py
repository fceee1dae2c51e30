"""Sources whose documents are records: ``.jsonl`` lines, ``.parquet`` rows, the rows of a saved dataset.

Each record's text sits in one named field (``data.text_field``: a JSON key, a Parquet column, a
dataset column). Records are read lazily, one at a time or one Parquet batch at a time, so a
``max_bytes`` cap bounds the memory a huge file takes. A record is held out by a hash of its
position, never of its text, so the split is deterministic and a record's side does not depend
on the cap. A file a user gave us is hostile until read: a line that is not JSON, a missing field,
a value that is not text, a file that is not Parquet each stop with one ``DataError`` line that
names the file and the line or column.

``DataError`` and the split key live here because every source raises the one and splits by the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from potluck.errors import PotluckError

__all__ = [
    "DataError",
    "is_record_file",
    "load_hf",
    "open_saved_dataset",
    "record_texts",
    "records_tokens",
    "rows_tokens",
    "split_key",
    "split_records",
]

# A .jsonl line longer than this (in characters) is refused rather than read whole: a file with no
# line ends would otherwise be read into memory at once, whatever max_bytes says.
MAX_LINE_CHARS = 1 << 26
_PARQUET_BATCH_ROWS = 1024


class DataError(PotluckError):
    """The training data cannot be used; the message says why and what to do."""


def split_key(name: str) -> float:
    """Uniform in [0, 1), a pure function of a document's name: its split side and order."""
    digest = hashlib.sha256(b"potluck/corpus-split\0" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def is_record_file(path: Path) -> bool:
    """Whether `path` is read as records (a ``.jsonl`` or ``.parquet`` file) rather than as plain text."""
    return path.suffix.lower() in (".jsonl", ".parquet")


def record_texts(path: Path, *, field: str) -> Iterator[str]:
    """The non-empty texts of a ``.jsonl`` or ``.parquet`` file's records, in file order, read lazily."""
    if path.suffix.lower() == ".jsonl":
        return _jsonl_texts(path, field=field)
    return _parquet_texts(path, column=field)


def _jsonl_texts(path: Path, *, field: str) -> Iterator[str]:
    # utf-8-sig: a byte-order mark some editors write is not part of the first object
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        number = 0
        while line := f.readline(MAX_LINE_CHARS + 1):
            number += 1
            if len(line.rstrip("\r\n")) > MAX_LINE_CHARS:
                raise DataError(f"{path}:{number} is over {MAX_LINE_CHARS} characters; a .jsonl line is one object")
            if not line.strip():
                continue
            record = _parse_line(line, where=f"{path}:{number}")
            if not isinstance(record, dict) or field not in record:
                fields = list(record)[:20] if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{number} has no {field!r} field (it has {fields}); "
                    "name the text's field (data.text_field, or --field)"
                )
            text = record[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {field!r} is {type(text).__name__}, not text")
            if text:
                # JSON can spell a lone surrogate ("\ud800"), which no UTF-8 encoder takes: it becomes "?"
                yield text if text.isascii() else text.encode("utf-8", errors="replace").decode("utf-8")


def _parse_line(line: str, *, where: str) -> Any:
    """One JSON value; DataError naming `where` for anything json refuses (ValueError covers a 5000-digit int)."""
    try:
        return json.loads(line)
    except RecursionError:
        why = "nested too deep"
    except json.JSONDecodeError as exc:
        why = exc.msg
    except ValueError as exc:
        why = _first_line(exc)
    raise DataError(f"{where} is not JSON ({why}); a .jsonl file has one object a line")


def _parquet_texts(path: Path, *, column: str) -> Iterator[str]:
    """The non-empty texts of a Parquet file's string ``column``; the file and its column are checked now."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs the pyarrow package: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path} as Parquet: {_first_line(exc)}") from None
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise DataError(f"{path} has columns {schema.names[:20]}; it needs a {column!r} column of text")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {column!r} holds {kind}, not text")
    return _parquet_rows(parquet, path, column=column)


def _parquet_rows(parquet: Any, path: Path, *, column: str) -> Iterator[str]:
    """The file's texts a batch of rows at a time; a body that proves corrupt is one line, not a traceback."""
    import pyarrow as pa

    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            yield from (text for text in batch.column(0).to_pylist() if text)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path} as Parquet: {_first_line(exc)}") from None


def _budgets(max_bytes: int | None, val_fraction: float) -> tuple[int | None, int | None]:
    """(training, held-out) byte budgets: the held-out side's share of the cap, at least one byte."""
    if max_bytes is None:
        return None, None
    val_budget = max(1, round(max_bytes * val_fraction))
    return max_bytes - val_budget, val_budget


def split_records(
    texts: Iterable[str], *, val_fraction: float, max_bytes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Records as training and held-out byte tokens, each record's UTF-8 text followed by a newline.

    Record ``i`` is held out when ``split_key("row/i") < val_fraction`` (a saved dataset's rows are
    split the same way); when none is, the first record is. Each side keeps records in file order up
    to its share of ``max_bytes``, the last one cut short; reading stops once both sides are full.
    """
    budgets = _budgets(max_bytes, val_fraction)
    sides: tuple[list[bytes], list[bytes]] = ([], [])
    totals, full = [0, 0], [False, False]
    for index, text in enumerate(texts):
        side = int(split_key(f"row/{index}") < val_fraction)
        if full[side]:
            continue
        data = text.encode() + b"\n"
        budget = budgets[side]
        if budget is not None:
            data = data[: budget - totals[side]]
            full[side] = totals[side] + len(data) >= budget
        sides[side].append(data)
        totals[side] += len(data)
        if all(full):
            break
    if not sides[1] and sides[0]:
        first = sides[0].pop(0)
        sides[1].append(first if budgets[1] is None else first[: budgets[1]])
    train, val = (np.frombuffer(b"".join(chunks), dtype=np.uint8) for chunks in sides)
    return train, val


def records_tokens(texts: Iterable[str], *, budget: int | None) -> np.ndarray:
    """All of `texts` as byte tokens, each text followed by a newline, up to `budget` bytes (the last cut short)."""
    chunks, total = [], 0
    for text in texts:
        if budget is not None and total >= budget:
            break
        data = text.encode() + b"\n"
        if budget is not None:
            data = data[: budget - total]
        chunks.append(data)
        total += len(data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def open_saved_dataset(path: str, *, column: str) -> tuple[Any, Any]:
    """A dataset saved with ``datasets.save_to_disk``: its train rows and its held-out rows (or None).

    A saved ``DatasetDict`` gives its "train" split and, when present, "validation" (or "test");
    a plain ``Dataset`` is all train. Both must have ``column``, and it must hold text.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"source 'hf:{path}' needs the datasets package: pip install datasets") from None
    if not Path(path).exists():
        raise DataError(f"no saved dataset at {path!r}; write one with Dataset.save_to_disk({path!r})")
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # datasets raises several unrelated types for a bad directory
        raise DataError(f"cannot load a dataset from {path!r}: {_first_line(exc)}") from None

    held_out = None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"dataset at {path!r} has splits {list(loaded)}; it needs a 'train' split")
        held_out = loaded.get("validation", loaded.get("test"))
        loaded = loaded["train"]
    for ds in (loaded, held_out):
        if ds is None:
            continue
        if column not in ds.column_names:
            raise DataError(f"dataset at {path!r} has columns {ds.column_names}; it needs a {column!r} column of text")
        if getattr(ds.features[column], "dtype", None) not in ("string", "large_string"):  # a list has none
            raise DataError(f"dataset at {path!r}: column {column!r} holds {ds.features[column]}, not text")
    return loaded, held_out


def rows_tokens(rows: Iterable[dict[str, str | None]], *, column: str, budget: int | None) -> np.ndarray:
    """A dataset's rows as byte tokens: each row's `column` (empty when None) and a newline, up to `budget` bytes."""
    return records_tokens(((row[column] or "") for row in rows), budget=budget)


def load_hf(path: str, *, column: str, val_fraction: float, max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A dataset saved with ``datasets.save_to_disk``: rows of its `column` are documents.

    A saved ``DatasetDict`` uses its "train" split and, when present, "validation" (or "test")
    as held-out text; otherwise rows are held out by a hash of their index.
    Each row is encoded as UTF-8 and followed by a newline.
    """
    loaded, held_out = open_saved_dataset(path, column=column)
    train_budget, val_budget = _budgets(max_bytes, val_fraction)
    if held_out is not None:
        return (
            rows_tokens(loaded, column=column, budget=train_budget),
            rows_tokens(held_out, column=column, budget=val_budget),
        )
    val_rows = [i for i in range(len(loaded)) if split_key(f"row/{i}") < val_fraction] or [0]
    val_set = set(val_rows)
    train_rows = [i for i in range(len(loaded)) if i not in val_set]
    return (
        rows_tokens(loaded.select(train_rows), column=column, budget=train_budget),
        rows_tokens(loaded.select(val_rows), column=column, budget=val_budget),
    )
