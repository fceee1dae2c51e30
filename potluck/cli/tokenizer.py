"""`potluck tokenizer train`: a byte-level BPE tokenizer (tokenizer.json) trained on the user's own text."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import FileSizeColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from potluck.cli.common import UsageError, stderr, stdout

tokenizer_app = typer.Typer(help="Make tokenizers for runs that train on tokens, not bytes.", no_args_is_help=True)


def _check_out(out: Path, *, force: bool) -> Path:
    """The output path, refused in one line before any work if it cannot or must not be written."""
    out = out.expanduser()
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; name the file to write, e.g. {out / 'tokenizer.json'}")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"directory {parent} does not exist; create it or pick another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to directory {parent}; pick another --out")
    return out


class _Reading:
    """The texts handed to the trainer, counted, with the count shown on a progress line."""

    def __init__(self, texts: Iterable[str], progress: Progress, *, max_bytes: int | None) -> None:
        self.texts = texts
        self.progress = progress
        self.task = progress.add_task("reading text", total=max_bytes)
        self.bytes = 0  # UTF-8 bytes handed over so far
        self.count = 0  # texts handed over

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.bytes += len(text.encode("utf-8"))
            self.count += 1
            self.progress.update(self.task, completed=self.bytes)
            yield text
        # The trainer counts words as it reads; the merges come once the text is all in.
        self.progress.update(self.task, description="learning merges")


@tokenizer_app.command("train")
def train(
    vocab_size: Annotated[int, typer.Option(help="Tokens in the vocabulary, special and byte tokens included.")],
    out: Annotated[Path, typer.Option(help="The tokenizer.json file to write.")],
    data: Annotated[
        str,
        typer.Option(
            help="The text: 'builtin', a text file or directory, a .jsonl or .parquet file, or hf:<saved dataset dir>."
        ),
    ] = "builtin",
    field: Annotated[
        str, typer.Option("--field", "--column", help="The text field of .jsonl records, or column of .parquet/hf.")
    ] = "text",
    max_bytes: Annotated[int | None, typer.Option(help="Read at most this many bytes of text.")] = None,
    min_frequency: Annotated[int, typer.Option(help="Merge only pairs seen at least this often.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer on your text (the same text gives the same file) and write tokenizer.json."""
    from potluck.training.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, save_tokenizer, train_tokenizer

    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        top = f"{MAX_VOCAB_SIZE:,}"
        raise UsageError(f"--vocab-size {vocab_size} is out of range; pick one from {MIN_VOCAB_SIZE} to {top}")
    if max_bytes is not None and max_bytes < 1:
        raise UsageError(f"--max-bytes must be positive, got {max_bytes}")
    if min_frequency < 1:
        raise UsageError(f"--min-frequency must be at least 1, got {min_frequency}")
    out = _check_out(out, force=force)
    from potluck.training.data import iter_texts  # after the checks: it imports torch, seconds on a slow machine

    texts = iter_texts(data, field=field, max_bytes=max_bytes)

    started = time.perf_counter()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        FileSizeColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        reading = _Reading(texts, progress, max_bytes=max_bytes)
        tokenizer_json = train_tokenizer(reading, vocab_size=vocab_size, min_frequency=min_frequency)
    if out.exists() and not force:  # it appeared while we trained
        raise UsageError(f"{out} already exists; pass --force to replace it")
    tokenizer = save_tokenizer(tokenizer_json, out)
    seconds = time.perf_counter() - started

    if as_json:
        result = {
            "path": str(out),
            "vocab_size": tokenizer.vocab_size,
            "requested_vocab_size": vocab_size,
            "sha256": tokenizer.sha256,
            "bytes_read": reading.bytes,
            "texts": reading.count,
            "seconds": round(seconds, 3),
        }
        print(json.dumps(result))
        return
    short = "" if tokenizer.vocab_size == vocab_size else f" (of {vocab_size:,} asked: the text repeats too few pairs)"
    stdout.print(
        f"trained a BPE tokenizer of {tokenizer.vocab_size:,} tokens{short} on {reading.bytes:,} bytes "
        f"in {seconds:.1f} s: sha256 {tokenizer.sha256[:16]}, wrote {out}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
