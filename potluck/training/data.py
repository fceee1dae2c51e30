"""Byte-level token streams: where training text comes from and how peers sample it.

A corpus is two uint8 arrays (one token per byte, matching the built-in GPT's 256-token
vocabulary): ``train`` for the peers and ``val``, held out for evaluation. Held-out text is
chosen *by document*: files are ranked by a hash of their relative path and the first ones,
up to ``val_fraction`` of the bytes, are held out. Validation loss then measures text the
model has never seen (not the other half of a file it trained on), and since the split is
made before ``max_bytes`` trims anything, a file's side never depends on the cap. Records
(``.jsonl`` lines, ``.parquet`` rows, a saved dataset's rows) are held out by a hash of their
position instead (potluck.training.sources).

Files are concatenated in the order of that same hash, not alphabetically, so every peer's
contiguous shard (see ``BatchSampler``) holds a random mix of documents rather than, say,
all of ``asyncio/``.

Sources: ``"builtin"`` (the Python standard library's own ``.py`` files, which every Python
install carries), a text file, a directory of text files, a ``.jsonl`` or ``.parquet`` file
(the text in one named field or column; ``.parquet`` needs ``pyarrow``), or ``"hf:<dir>"`` (a
Hugging Face dataset written with ``save_to_disk``; needs the optional ``datasets`` package).
A run with a separate held-out source reads each side whole instead (``load_source``).
"""

from __future__ import annotations

import codecs
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from potluck.training.sources import (
    DataError,
    is_record_file,
    load_hf,
    open_saved_dataset,
    record_texts,
    records_tokens,
    rows_tokens,
    split_key,
    split_records,
)

__all__ = [
    "BatchSampler",
    "Corpus",
    "DataError",
    "builtin_corpus_files",
    "iter_texts",
    "load_corpus",
    "load_source",
    "val_batches",
]

logger = logging.getLogger(__name__)

# git's binary-file heuristic: a NUL byte in the first 8000 bytes means "not text".
_TEXT_SNIFF_BYTES = 8000
# Directory names under the stdlib never read for the built-in corpus: installed packages,
# caches, and the stdlib's own test suites (often missing from slim installs such as Debian's
# python3-minimal, and full of deliberately malformed files).
_BUILTIN_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass(frozen=True, kw_only=True, slots=True)
class Corpus:
    """A loaded corpus: byte tokens for training and held-out evaluation."""

    train: np.ndarray  # uint8, 1-D, read-only (copy before torch.from_numpy)
    val: np.ndarray  # as train; documents disjoint from train's (or the tail of a single file)
    source: str  # the source string it was loaded from, for logs and the status page


@dataclass(frozen=True, slots=True)
class _Doc:
    relpath: str  # POSIX path relative to the source root: the split and order key
    path: Path
    size: int

    @property
    def key(self) -> float:
        return split_key(self.relpath)


def builtin_corpus_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted: the built-in corpus every install carries.

    Installed packages, caches and the stdlib's test suites are skipped, and so are hidden
    entries and the machine-specific ``_sysconfigdata_*`` module, to keep the list the same
    across installs of one Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _BUILTIN_SKIP_DIRS and not d.startswith(".")]
        files += [
            Path(dirpath, name)
            for name in filenames
            if name.endswith(".py") and not name.startswith((".", "_sysconfigdata"))
        ]
    return sorted(files)


def load_corpus(
    source: str = "builtin", *, val_fraction: float = 0.02, max_bytes: int | None = None, field: str = "text"
) -> Corpus:
    """Load a corpus and split it into train and held-out tokens.

    Documents are ranked by a hash of their relative path and the first ones, up to
    ``val_fraction`` of the bytes, are held out; a single file is split by position instead
    (its last ``val_fraction``), and records (``.jsonl``, ``.parquet``, ``hf:``; their text in
    ``field``) by a hash of their position. ``max_bytes``
    caps the bytes read: each side keeps its share of the cap, filled with whole documents
    in hash order and the last one cut short, so the choice is deterministic and only the
    chosen files are read. Raises ``DataError`` for a missing, empty, binary or malformed source.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2 (one train and one held-out byte), got {max_bytes}")

    if source.startswith("hf:"):
        train, val = load_hf(source[3:], column=field, val_fraction=val_fraction, max_bytes=max_bytes)
    elif source == "builtin":
        train, val = _split_docs(_builtin_docs(), val_fraction=val_fraction, max_bytes=max_bytes)
    else:
        path = _local(source)
        if path.is_dir():
            docs = _dir_docs(path, source)
            if len(docs) == 1:
                train, val = _split_file(docs[0].path, val_fraction=val_fraction, max_bytes=max_bytes)
            else:
                train, val = _split_docs(docs, val_fraction=val_fraction, max_bytes=max_bytes)
        elif is_record_file(path):
            train, val = split_records(record_texts(path, field=field), val_fraction=val_fraction, max_bytes=max_bytes)
        else:
            _check_text_file(path, source)
            train, val = _split_file(path, val_fraction=val_fraction, max_bytes=max_bytes)

    if train.size == 0 or val.size == 0:
        raise DataError(f"corpus {source!r} is too small to split into train and held-out text; add more text")
    logger.info("corpus %s: %d train bytes, %d held-out bytes", source, train.size, val.size)
    return Corpus(train=train, val=val, source=source)


def load_source(
    source: str, *, field: str = "text", max_bytes: int | None = None, held_out: bool = False
) -> np.ndarray:
    """All of a source's text as byte tokens, none held out: either side of a run with a separate held-out source.

    Documents come in ``load_corpus``'s order and ``max_bytes`` caps the bytes read (the last
    document cut short; only what is kept is read). A saved ``DatasetDict`` gives its train split,
    or with ``held_out`` its "validation" (or "test") split where it has one. Raises ``DataError``
    for a missing, empty, binary or malformed source.
    """
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if source.startswith("hf:"):
        train, held = open_saved_dataset(source[3:], column=field)
        rows = held if held_out and held is not None else train
        tokens = rows_tokens(rows, column=field, budget=max_bytes)
    elif source == "builtin":
        tokens = _read_docs(_in_order(_builtin_docs()), budget=max_bytes)
    else:
        path = _local(source)
        if path.is_dir():
            tokens = _read_docs(_in_order(_dir_docs(path, source)), budget=max_bytes)
        elif is_record_file(path):
            tokens = records_tokens(record_texts(path, field=field), budget=max_bytes)
        else:
            _check_text_file(path, source)
            tokens = _read_docs([_doc(path.parent, path)], budget=max_bytes)
    if tokens.size == 0:
        raise DataError(f"data source {source!r} holds no text; add some or pick another source")
    logger.info("%s %s: %d bytes", "held-out source" if held_out else "source", source, tokens.size)
    return tokens


def _local(source: str) -> Path:
    """The file or directory `source` names; DataError when there is none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {source!r} does not exist; pass a text, .jsonl or .parquet file, a directory, "
            "'builtin' or 'hf:<dir>'"
        )
    if not os.access(path, os.R_OK):
        raise DataError(f"data source {source!r} is not readable by this user; check its permissions")
    return path


def _check_text_file(path: Path, source: str) -> None:
    if not _is_text(path):
        raise DataError(f"{source!r} is not a text file (it has NUL bytes); pass UTF-8 or other plain text")


def _builtin_docs() -> list[_Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [doc for doc in (_doc(root, p) for p in builtin_corpus_files()) if doc.size > 0]


def _dir_docs(path: Path, source: str) -> list[_Doc]:
    docs = _text_docs(path)
    if not docs:
        raise DataError(f"directory {source!r} holds no non-empty text files; add some or pick another source")
    return docs


def _in_order(docs: list[_Doc]) -> list[_Doc]:
    """Documents in the corpus's order: by the hash of their relative path."""
    return sorted(docs, key=lambda d: (d.key, d.relpath))


def _doc(root: Path, path: Path) -> _Doc:
    return _Doc(relpath=path.relative_to(root).as_posix(), path=path, size=path.stat().st_size)


def _is_text(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" not in f.read(_TEXT_SNIFF_BYTES)


def _text_docs(root: Path) -> list[_Doc]:
    """Non-empty text files under ``root``, recursively, skipping hidden entries (``.git``)."""
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name.startswith(".") or not path.is_file():
                continue
            doc = _doc(root, path)
            if doc.size > 0 and _is_text(path):
                docs.append(doc)
    return docs


def _split_docs(docs: list[_Doc], *, val_fraction: float, max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the first documents in hash order, up to ``val_fraction`` of all bytes.

    Each side is then concatenated in hash order up to its share of ``max_bytes``. The
    split is made over every document before the cap, so a document's side does not depend
    on ``max_bytes``. At least one document lands on each side.
    """
    if len(docs) < 2:
        raise DataError("need at least two documents to hold one out; add more files")
    docs = _in_order(docs)
    val_target, n_val, val_size = val_fraction * sum(d.size for d in docs), 0, 0
    while n_val < len(docs) - 1 and (n_val == 0 or val_size < val_target):
        val_size += docs[n_val].size
        n_val += 1
    val_docs, train_docs = docs[:n_val], docs[n_val:]

    if max_bytes is None:
        val_budget = train_budget = None
    else:
        val_budget = max(1, round(max_bytes * val_fraction))
        val_budget = min(val_budget, sum(d.size for d in val_docs))
        train_budget = max_bytes - val_budget
    return _read_docs(train_docs, budget=train_budget), _read_docs(val_docs, budget=val_budget)


def _read_docs(docs: Iterable[_Doc], *, budget: int | None) -> np.ndarray:
    chunks, total = [], 0
    for doc in docs:
        if budget is not None and total >= budget:
            break
        limit = -1 if budget is None else budget - total
        with doc.path.open("rb") as f:
            chunk = f.read(limit)
        chunks.append(chunk)
        total += len(chunk)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def _split_file(path: Path, *, val_fraction: float, max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One document: the last ``val_fraction`` of its (capped) bytes is held out."""
    with path.open("rb") as f:
        data = f.read(-1 if max_bytes is None else max_bytes)
    if len(data) < 2:
        raise DataError(f"{str(path)!r} has {len(data)} bytes; a corpus needs enough text to hold some out")
    n_val = max(1, round(len(data) * val_fraction))
    tokens = np.frombuffer(data, dtype=np.uint8)
    return tokens[:-n_val], tokens[-n_val:]


def iter_texts(source: str = "builtin", *, field: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    """The text of every document of a source, lazily, for work over plain text such as training a tokenizer.

    Sources are those of ``load_corpus``: ``"builtin"``, a text file, a directory of text
    files, a ``.jsonl`` file (one JSON object a line), a ``.parquet`` file and ``"hf:<dir>"``
    (whose train split is read); ``field`` names the text field of their records. Files come
    in ``load_corpus``'s hash order, so a ``max_bytes``
    cap (UTF-8 bytes, the last text cut short) takes a mix of documents rather than the first
    directory; only what is yielded is read. A file over 1 MiB is yielded a piece at a time
    (cut at line ends), so a text is a document or a piece of one: put no end-of-document token
    between texts of a plain file. Bytes that are not UTF-8 become U+FFFD. Raises
    ``DataError`` for a missing or unusable source.
    """
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    texts: Iterator[str]
    if source.startswith("hf:"):
        train, _ = open_saved_dataset(source[3:], column=field)
        texts = (row[field] for row in train if row[field])
    elif source == "builtin":
        texts = _docs_texts(_builtin_docs())
    else:
        path = _local(source)
        if path.is_dir():
            texts = _docs_texts(_dir_docs(path, source))
        elif is_record_file(path):
            texts = record_texts(path, field=field)
        else:
            _check_text_file(path, source)
            texts = _file_texts(path)
    return texts if max_bytes is None else _capped(texts, max_bytes)


def _docs_texts(docs: list[_Doc]) -> Iterator[str]:
    for doc in _in_order(docs):
        yield from _file_texts(doc.path)


# A large text file is yielded in pieces of about this many bytes, each ending at a line's end where it can.
_TEXT_PIECE_BYTES = 2**20


def _file_texts(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    with path.open("rb") as f:
        while chunk := f.read(_TEXT_PIECE_BYTES):
            text = carry + decoder.decode(chunk)
            cut = text.rfind("\n") + 1 or len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]
    if tail := carry + decoder.decode(b"", final=True):
        yield tail


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """``texts`` up to ``max_bytes`` UTF-8 bytes in all; the text that crosses the cap is cut there."""
    left = max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if len(data) >= left:
            yield data[:left].decode("utf-8", errors="ignore")  # a character cut in two is dropped
            return
        left -= len(data)
        yield text


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows of ``block_size + 1`` tokens at ``starts``."""
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _check_batch_shape(batch_size: int, block_size: int) -> None:
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")


class BatchSampler:
    """Random training windows from one peer's shard of the token stream.

    Shard ``s`` of ``n`` owns the contiguous slice ``[s*N//n, (s+1)*N//n)`` of the ``N``
    tokens, and its windows lie wholly inside it, so peers train on disjoint data. Batch ``k``
    is a pure function of ``(seed, shard, num_shards, k)``: a restarted peer that passes
    ``start=k`` continues the exact sequence.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        block_size: int,
        shard: int,
        num_shards: int,
        seed: int,
        start: int = 0,
    ) -> None:
        _check_batch_shape(batch_size, block_size)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
        if seed < 0 or start < 0:
            raise ValueError(f"seed and start must be non-negative, got {seed} and {start}")
        n = len(tokens)
        self.bounds = (shard * n // num_shards, (shard + 1) * n // num_shards)  # [lo, hi) token indices
        lo, hi = self.bounds
        if hi - lo < block_size + 1:
            raise DataError(
                f"shard {shard} of {num_shards} has {hi - lo} tokens but block_size {block_size} needs at least "
                f"{block_size + 1}; use more text, fewer shards or a smaller block_size"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.calls = start  # batches drawn so far
        self._key = (seed, shard, num_shards)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` pair, int64 ``[batch_size, block_size]``, ``y`` = ``x`` shifted by one."""
        rng = np.random.default_rng([*self._key, self.calls])
        self.calls += 1
        lo, hi = self.bounds
        starts = rng.integers(lo, hi - self.block_size, size=self.batch_size)  # window = block_size + 1 tokens
        return _windows(self.tokens, starts, self.block_size)


def val_batches(
    tokens: np.ndarray, *, batch_size: int, block_size: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: ``num_batches * batch_size`` windows evenly spaced over ``tokens``.

    Every caller with the same tokens gets the same batches, so losses from different peers
    and aggregators are comparable.
    """
    _check_batch_shape(batch_size, block_size)
    if num_batches < 1:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    if len(tokens) < block_size + 1:
        raise DataError(
            f"held-out text has {len(tokens)} tokens but block_size {block_size} needs at least {block_size + 1}; "
            "use a larger corpus, a larger val_fraction or a smaller block_size"
        )
    starts = np.linspace(0, len(tokens) - block_size - 1, num=num_batches * batch_size).round().astype(np.int64)
    return [_windows(tokens, chunk, block_size) for chunk in starts.reshape(num_batches, batch_size)]
