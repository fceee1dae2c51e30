"""A language task's data: record sources, and a separate held-out source that every node scores on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from potluck.protocol.config import RunConfig
from potluck.protocol.file_store import TOKENIZERS, store
from potluck.tasks import task_for
from potluck.tasks.language import LanguageModelTask
from potluck.training.data import DataError
from potluck.training.tokenizer import train_tokenizer


class _TokenizedText(LanguageModelTask):
    """A language task over a tokenizer's tokens with no model to build (transformers takes seconds to import)."""

    block_size = 16
    model_vocab_size = 300

    def build_model(self, *, seed: int) -> nn.Module:
        raise NotImplementedError

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _run(**overrides: object) -> RunConfig:
    return RunConfig().with_overrides({"model.block_size": 16, **overrides}, source="test")


def _jsonl(path: Path, texts: list[str], *, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def test_a_jsonl_source_trains_on_its_named_field_and_holds_records_out(tmp_path: Path) -> None:
    texts = [f"record {i:03d} " + "z" * 20 for i in range(200)]
    source = _jsonl(tmp_path / "rows.jsonl", texts, field="body")

    task = task_for(_run(**{"data.source": str(source), "data.text_field": "body", "data.val_fraction": 0.1}))

    train, held_out = task.train_tokens.tobytes().split(b"\n")[:-1], task.held_out_tokens.tobytes().split(b"\n")[:-1]
    assert sorted(train + held_out) == sorted(t.encode() for t in texts)
    assert held_out and set(train).isdisjoint(held_out)
    assert task.held_out_batches(batch_size=2, count=2)[0][0].shape == (2, 16)


def test_a_separate_held_out_source_is_what_every_node_scores_on(tmp_path: Path) -> None:
    # Prepare: training text all "a", held-out text all "b"
    source = _jsonl(tmp_path / "train.jsonl", ["a" * 40] * 50)
    held_out = tmp_path / "held-out.txt"
    held_out.write_text("b" * 600)
    # Execute
    task = task_for(_run(**{"data.source": str(source), "data.held_out_source": str(held_out)}))
    batches = task.held_out_batches(batch_size=2, count=3)
    # Assert: every held-out window is the held-out source's; all of the source is training text
    assert {int(t) for x, y in batches for t in (*x.unique(), *y.unique())} == {ord("b")}
    assert task.train_tokens.tobytes() == ("a" * 40 + "\n").encode() * 50
    assert task.held_out_tokens.tobytes() == held_out.read_bytes()


def test_a_peer_trains_without_the_held_out_source_and_scoring_without_it_is_one_line(tmp_path: Path) -> None:
    own = tmp_path / "mine.txt"
    own.write_text("my own text\n" * 20)
    cfg = _run(**{"data.source": "builtin", "data.held_out_source": str(tmp_path / "not-here.jsonl")})

    peer = task_for(cfg, data_source=str(own))

    assert peer.train_tokens.tobytes() == own.read_bytes()
    with pytest.raises(DataError, match="not-here.jsonl' does not exist"):
        peer.held_out_batches(batch_size=2, count=1)


def test_each_side_is_tokenized_once_into_a_cache_entry_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a BPE tokenizer in this machine's store, a training source and a held-out source
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "cache"))
    train_text, held_out_text = "def f(x):\n    return x\n" * 30, "class A:\n    pass\n" * 30
    sha = store(TOKENIZERS, train_tokenizer([train_text, held_out_text], vocab_size=300))
    (tmp_path / "train.txt").write_text(train_text)
    (tmp_path / "held-out.txt").write_text(held_out_text)
    cfg = _run(
        **{
            "data.tokenizer": sha,
            "data.source": str(tmp_path / "train.txt"),
            "data.held_out_source": str(tmp_path / "held-out.txt"),
        }
    )
    # Execute
    task = _TokenizedText(cfg)
    train, held_out = np.array(task.train_tokens), np.array(task.held_out_tokens)
    # Assert: two cache entries, one a side, each the tokens of its own source
    entries = sorted((tmp_path / "cache" / "tokens").iterdir())
    assert len(entries) == 2 and all((entry / "tokens.npy").exists() for entry in entries)
    assert task.decode(train.tolist()) == train_text and task.decode(held_out.tolist()) == held_out_text
    # and a node that runs the same config again reads them from the cache, not from the sources
    (tmp_path / "train.txt").unlink()
    (tmp_path / "held-out.txt").unlink()
    again = _TokenizedText(cfg)
    assert np.array_equal(again.train_tokens, train) and np.array_equal(again.held_out_tokens, held_out)
