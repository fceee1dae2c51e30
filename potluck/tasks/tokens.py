"""A run's tokenizer and its tokenized corpus, kept on disk by content.

A run that names a tokenizer records its sha256 (`data.tokenizer`); the file itself sits in this
machine's store (potluck.protocol.file_store), put there when the run is loaded or when a node receives
it with the state, and read back only by that hash. Tokenizing a large
corpus is slow (the tokenizers library reads about a megabyte a second on a small CPU), so it happens
once: the token arrays are kept next to it, keyed by the corpus's source, its split (or the role of a source read
whole, such as a run's separate held-out source) and the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from potluck.protocol.file_store import TOKENIZERS, cache_dir, store, stored
from potluck.tasks.base import TaskError
from potluck.training.data import Corpus
from potluck.training.tokenizer import HFTokenizer, Tokenizer

PIECE_CHARS = 1 << 20  # text is encoded in pieces of about this many characters, cut at line ends


def stored_tokenizer(sha: str) -> HFTokenizer:
    """The run's tokenizer from this machine's store; TaskError when it is not there yet."""
    data = stored(TOKENIZERS, sha)
    if data is None:
        raise TaskError(f"the run's tokenizer {sha[:12]} is not on this machine; it comes with the run's state")
    return HFTokenizer(data)


def brought_tokenizer(path: str | Path) -> str:
    """Check the tokenizer.json a volunteer brings (`peer --tokenizer`) and keep it in the store; its sha256.

    TokenizerError (one line) when it cannot be read or is not a tokenizer.
    """
    tokenizer = HFTokenizer.from_file(path)
    store(TOKENIZERS, tokenizer.data)
    return tokenizer.sha256


def tokenized(corpus: Corpus, tokenizer: Tokenizer, *, key: str) -> Corpus:
    """`corpus` (bytes) as the tokenizer's tokens, from the cache when this corpus was tokenized before.

    `key` names the corpus (its source and split); the tokenizer's sha256 completes the cache's key.
    """
    where = _cache_entry(key, tokenizer)
    train = _cached(where / "train.npy", lambda: corpus.train, tokenizer, what=f"train of {corpus.source}")
    val = _cached(where / "val.npy", lambda: corpus.val, tokenizer, what=f"val of {corpus.source}")
    return Corpus(train=train, val=val, source=corpus.source)


def tokenized_text(read: Callable[[], np.ndarray], tokenizer: Tokenizer, *, key: str, what: str) -> np.ndarray:
    """The text `read` returns (UTF-8 bytes) as the tokenizer's tokens; from the cache, unread, when it is there.

    `key` names the text (its source and how it was read, e.g. a run's separate held-out source); the
    tokenizer's sha256 completes the cache's key. `what` names it on the progress bar.
    """
    return _cached(_cache_entry(key, tokenizer) / "tokens.npy", read, tokenizer, what=what)


def _cache_entry(key: str, tokenizer: Tokenizer) -> Path:
    digest = hashlib.sha256(json.dumps([key, tokenizer.sha256]).encode()).hexdigest()[:32]
    return cache_dir() / "tokens" / digest


def _cached(path: Path, read: Callable[[], np.ndarray], tokenizer: Tokenizer, *, what: str) -> np.ndarray:
    """The token array at `path`, or `read()`'s text tokenized and written there (whole, then renamed)."""
    if path.exists():
        return np.load(path, mmap_mode="r")
    tokens = _encode(read(), tokenizer, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
    np.save(partial, tokens)
    partial.replace(path)
    return tokens


def _encode(data: np.ndarray, tokenizer: Tokenizer, *, what: str) -> np.ndarray:
    """Token ids of the text in `data` (UTF-8 bytes), encoded piece by piece with a progress bar on stderr."""
    from rich.progress import Progress

    text = bytes(data).decode("utf-8", errors="replace")
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    out = []
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        bar = progress.add_task(f"tokenizing {what}", total=len(pieces))
        for index in range(0, len(pieces), 8):
            out.extend(tokenizer.encode_batch(pieces[index : index + 8]))
            progress.advance(bar, len(pieces[index : index + 8]))
    return np.concatenate(out).astype(tokenizer.dtype) if out else np.zeros(0, dtype=tokenizer.dtype)
