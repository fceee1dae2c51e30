"""Tokenizers: the byte default, tokenizer.json files checked on load, BPE training, and the transformers layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from potluck.training.tokenizer import (
    BYTES_SHA256,
    EOS_TOKEN,
    MAX_TOKENIZER_BYTES,
    PAD_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    encode_documents,
    load_tokenizer,
    save_for_transformers,
    save_tokenizer,
    token_dtype,
    train_tokenizer,
)

TEXTS = [
    f"def function_{i}(value):\n    return value * {i} + len('ünïcödé {i}')  # 😀 comment\n\n" for i in range(300)
] + ["The quick brown fox jumps over the lazy dog. " * 20, "tabs\tand  double  spaces\r\nand CRLF\r\n"]
SAMPLES = ["", "plain words", "  leading and trailing  ", "def f(x):\n\treturn x ** 2\n", "é 😀 中文 \x00 \u200b"]


@pytest.fixture(scope="module")
def trained() -> bytes:
    return train_tokenizer(TEXTS, vocab_size=400)


def _one_line(exc: pytest.ExceptionInfo[TokenizerError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_the_byte_tokenizer_is_todays_byte_stream() -> None:
    tokenizer = load_tokenizer(None)

    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.uint8
        np.testing.assert_array_equal(ids, np.frombuffer(text.encode("utf-8"), np.uint8))
        assert tokenizer.decode(ids) == text
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.sha256, tokenizer.eos_id) == (256, BYTES_SHA256, None)


def test_the_byte_tokenizer_decodes_a_cut_character_as_a_replacement() -> None:
    assert ByteTokenizer().decode(np.frombuffer("é".encode()[:1], np.uint8)) == "\ufffd"


def test_a_trained_tokenizer_round_trips_any_text_and_compresses_its_own(trained: bytes) -> None:
    tokenizer = HFTokenizer(trained)

    for text in [*SAMPLES, *TEXTS[:3]]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.uint16
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(TEXTS[5])) < len(TEXTS[5].encode()) / 2
    assert tokenizer.vocab_size == 400
    assert tokenizer.sha256 == hashlib.sha256(trained).hexdigest()
    assert (tokenizer.eos_id, tokenizer.pad_token, tokenizer.eos_token) == (0, PAD_TOKEN, EOS_TOKEN)


def test_encode_batch_equals_encode_one_by_one(trained: bytes) -> None:
    tokenizer = HFTokenizer(trained)

    batch = tokenizer.encode_batch(TEXTS[:50])

    assert len(batch) == 50
    for text, ids in zip(TEXTS[:50], batch, strict=True):
        np.testing.assert_array_equal(ids, tokenizer.encode(text))


def test_an_end_of_text_token_written_in_the_text_is_text(trained: bytes) -> None:
    tokenizer = HFTokenizer(trained)

    ids = tokenizer.encode(f"a {EOS_TOKEN} b")

    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == f"a {EOS_TOKEN} b"


def test_documents_are_joined_with_the_end_of_text_token(trained: bytes) -> None:
    tokenizer = HFTokenizer(trained)
    docs = ["first doc", "second", "third one"]

    stream = encode_documents(tokenizer, docs, batch_size=2)

    expected = np.concatenate([np.append(tokenizer.encode(d), tokenizer.eos_id) for d in docs])
    np.testing.assert_array_equal(stream, expected)
    assert stream.dtype == np.uint16
    assert tokenizer.decode(stream, skip_special_tokens=True) == "".join(docs)
    bytes_stream = encode_documents(ByteTokenizer(), docs)
    np.testing.assert_array_equal(bytes_stream, np.frombuffer("".join(docs).encode(), np.uint8))
    assert encode_documents(tokenizer, []).size == 0


def test_training_twice_gives_the_same_file(trained: bytes) -> None:
    assert train_tokenizer(TEXTS, vocab_size=400) == trained


def test_training_in_another_process_gives_the_same_file(trained: bytes, tmp_path: Path) -> None:
    # Prepare: another process has other hash seeds, in Python and in the library's Rust maps
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS))
    script = (
        "import hashlib, json, sys; from potluck.training.tokenizer import train_tokenizer; "
        "print(hashlib.sha256(train_tokenizer(json.load(open(sys.argv[1])), vocab_size=400)).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TOKENIZERS_PARALLELISM": "false"}
    # Execute
    result = subprocess.run(
        [sys.executable, "-c", script, str(texts)], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(trained).hexdigest()


def test_a_small_text_gives_fewer_tokens_than_asked() -> None:
    tokenizer = HFTokenizer(train_tokenizer(["ab ab ab"], vocab_size=5000))

    assert 258 <= tokenizer.vocab_size < 300
    assert tokenizer.decode(tokenizer.encode("ab ab ba")) == "ab ab ba"


@pytest.mark.parametrize("vocab_size", [0, 259, 1_000_001])
def test_a_vocabulary_size_out_of_range_is_refused(vocab_size: int) -> None:
    with pytest.raises(TokenizerError) as exc:
        train_tokenizer(TEXTS, vocab_size=vocab_size)
    assert "out of range" in _one_line(exc)


def test_no_text_is_refused() -> None:
    with pytest.raises(TokenizerError) as exc:
        train_tokenizer(["", ""], vocab_size=300)
    assert "no text" in _one_line(exc)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{not json", "not a valid tokenizer.json"),
        (b"{}", "not a valid tokenizer.json"),
        (b"[1, 2, 3]", "not a valid tokenizer.json"),
        (b"\xff\xfe\x00binary", "not UTF-8"),
        (b"", "not a valid tokenizer.json"),
    ],
)
def test_corrupt_bytes_are_refused_in_one_line(data: bytes, expected: str) -> None:
    with pytest.raises(TokenizerError) as exc:
        HFTokenizer(data, name="served.json")
    assert expected in _one_line(exc) and "served.json" in str(exc.value)


def test_oversized_bytes_are_refused_before_parsing() -> None:
    with pytest.raises(TokenizerError) as exc:
        HFTokenizer(b" " * (MAX_TOKENIZER_BYTES + 1))
    assert "limit" in _one_line(exc)


def test_an_oversized_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    with path.open("wb") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: nothing to read, only a size

    with pytest.raises(TokenizerError) as exc:
        HFTokenizer.from_file(path)
    assert "limit" in _one_line(exc) and str(path) in str(exc.value)


def test_a_missing_file_or_a_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as missing:
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(TokenizerError) as directory:
        load_tokenizer(tmp_path)

    assert "does not exist" in _one_line(missing)
    assert "directory" in _one_line(directory)


def test_a_file_loads_with_the_hash_of_its_bytes(trained: bytes, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    save_tokenizer(trained, path)

    tokenizer = load_tokenizer(path)

    assert path.read_bytes() == trained
    assert tokenizer.sha256 == hashlib.sha256(trained).hexdigest()


def test_a_foreign_files_truncation_is_switched_off() -> None:
    # Prepare: a file made for a 4-token model
    foreign = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "</s>": 2}, unk_token="[UNK]"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign.add_special_tokens(["</s>"])
    foreign.enable_truncation(4)
    # Execute
    tokenizer = HFTokenizer(foreign.to_str().encode())
    # Assert
    assert len(tokenizer.encode("a " * 10)) == 10
    assert (tokenizer.eos_id, tokenizer.vocab_size, tokenizer.dtype) == (2, 3, np.uint8)


def test_a_vocabulary_past_65536_tokens_gives_uint32_ids() -> None:
    vocab = {f"w{i}": i for i in range(70_000)}
    big = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()

    ids = HFTokenizer(big.to_str().encode()).encode("w69999 w3")

    assert ids.dtype == np.uint32 and ids.tolist() == [69_999, 3]
    assert [token_dtype(n) for n in (256, 257, 65_536, 65_537)] == [np.uint8, np.uint16, np.uint16, np.uint32]


def test_a_token_id_past_the_vocabulary_limit_is_refused() -> None:
    huge = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 2_000_000}, unk_token="a"))

    with pytest.raises(TokenizerError) as exc:
        HFTokenizer(huge.to_str().encode())
    assert "2,000,000" in _one_line(exc)


def test_a_named_end_of_text_token_must_exist(trained: bytes) -> None:
    assert HFTokenizer(trained, eos_token=PAD_TOKEN).eos_id == 1
    with pytest.raises(TokenizerError) as exc:
        HFTokenizer(trained, eos_token="<nope>")
    assert "<nope>" in _one_line(exc)


def test_save_for_transformers_writes_the_file_and_a_config_naming_its_tokens(trained: bytes, tmp_path: Path) -> None:
    # tests/unit/test_cli_tokenizer.py loads such a directory with AutoTokenizer in a fresh, offline process
    save_for_transformers(trained, tmp_path / "model", model_max_length=128)

    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == trained
    assert config == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": 128,
    }


def test_save_for_transformers_refuses_corrupt_bytes_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError):
        save_for_transformers(b"{broken", tmp_path / "model")
    assert not (tmp_path / "model").exists()
