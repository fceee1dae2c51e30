"""`potluck tokenizer train` as a user runs it: a tokenizer.json from their text, refusals in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from potluck.cli.app import app
from potluck.training.tokenizer import EOS_TOKEN, HFTokenizer, save_for_transformers

RUNNER = CliRunner()


def _texts(root: Path) -> Path:
    corpus = root / "corpus"
    for i in range(40):
        (corpus / f"part{i % 4}").mkdir(parents=True, exist_ok=True)
        (corpus / f"part{i % 4}" / f"doc{i}.txt").write_text(
            f"Document number {i} talks about volunteers, GPUs and potlucks.\n" * 20
        )
    return corpus


def _train(*args: str):  # noqa: ANN202 - typer's Result
    return RUNNER.invoke(app, ["tokenizer", "train", *args])


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script in a process of its own: one-line errors on stderr, exit 2."""
    command = [sys.executable, "-c", "from potluck.cli.app import main; main()", "tokenizer", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow  # importing transformers in a fresh process
def test_train_writes_a_tokenizer_that_transformers_loads_offline(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "tokenizer.json"
    # Execute
    result = _train("--data", str(_texts(tmp_path)), "--vocab-size", "320", "--out", str(out), "--json")
    # Assert: the line describes the file written
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tokenizer = HFTokenizer.from_file(out)
    assert report["sha256"] == tokenizer.sha256 and report["vocab_size"] == tokenizer.vocab_size == 320
    assert report["path"] == str(out) and report["texts"] == 40
    # and the file becomes a transformers tokenizer, loaded by a process with no network and no potluck import
    save_for_transformers(out.read_bytes(), tmp_path / "export", model_max_length=64)
    script = (
        "import json, sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "ids = t(sys.argv[2])['input_ids']; print(json.dumps({'ids': ids, 'text': t.decode(ids), "
        "'eos': t.eos_token_id, 'pad': t.pad_token_id, 'bos': t.bos_token, 'max': t.model_max_length}))"
    )
    text = "Document number 7 talks , about é 😀\n\tand more ."
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "export"), text],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["ids"] == tokenizer.encode(text).tolist() and loaded["text"] == text
    assert (loaded["eos"], loaded["pad"], loaded["bos"], loaded["max"]) == (0, 1, EOS_TOKEN, 64)


def test_the_same_text_gives_the_same_file_and_max_bytes_bounds_the_read(tmp_path: Path) -> None:
    corpus = str(_texts(tmp_path))

    first = _train("--data", corpus, "--vocab-size", "300", "--out", str(tmp_path / "a.json"), "--max-bytes", "5000")
    again = _train("--data", corpus, "--vocab-size", "300", "--out", str(tmp_path / "b.json"), "--max-bytes", "5000")

    assert first.exit_code == again.exit_code == 0, first.output + again.output
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert first.output.startswith("trained a BPE tokenizer of 300 tokens on 5,000 bytes")


def test_jsonl_records_are_read_by_their_field(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"row {i} of the table\n" * 5}) + "\n" for i in range(50)))
    out = tmp_path / "tok.json"

    result = _train("--data", str(rows), "--field", "body", "--vocab-size", "280", "--out", str(out), "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["texts"] == 50
    assert HFTokenizer.from_file(out).decode(HFTokenizer.from_file(out).encode("row 3 of")) == "row 3 of"


def test_an_existing_file_is_replaced_only_with_force(tmp_path: Path) -> None:
    # Prepare
    corpus = str(_texts(tmp_path))
    out = tmp_path / "tokenizer.json"
    out.write_text("keep me")
    # Execute
    refused = _console("--data", corpus, "--vocab-size", "300", "--out", str(out))
    kept = out.read_text()
    forced = _train("--data", corpus, "--vocab-size", "300", "--out", str(out), "--force")
    # Assert
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "Traceback" not in refused.stderr
    assert kept == "keep me"
    assert forced.exit_code == 0 and HFTokenizer.from_file(out).vocab_size == 300


def test_refusals_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    corpus = str(_texts(tmp_path))
    out = str(tmp_path / "tokenizer.json")
    cases = [
        (["--data", corpus, "--vocab-size", "259", "--out", out], "out of range"),
        (["--data", corpus, "--vocab-size", "1000001", "--out", out], "out of range"),
        (["--data", str(tmp_path / "missing"), "--vocab-size", "300", "--out", out], "does not exist"),
        (["--data", corpus, "--vocab-size", "300", "--out", str(tmp_path / "no" / "t.json")], "does not exist"),
        (["--data", corpus, "--vocab-size", "300", "--out", str(tmp_path)], "is a directory"),
        (["--data", corpus, "--vocab-size", "300", "--out", out, "--max-bytes", "0"], "--max-bytes"),
    ]
    for args, expected in cases:
        result = _train(*args)
        assert result.exit_code == 1 and expected in str(result.exception), (args, result.output)
    console = _console("--data", corpus, "--vocab-size", "12", "--out", out)
    assert console.returncode == 2 and console.stderr.startswith("potluck: error: --vocab-size 12 is out of range")
    assert console.stderr.strip().count("\n") == 0
    assert not (tmp_path / "tokenizer.json").exists()
