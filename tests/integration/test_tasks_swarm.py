"""Runs that train what their users bring: a task of one's own and a Hugging Face model, in real swarms; and
volunteers who cannot train the run's task are refused before they train, in one line."""

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potluck.aggregator_server.checkpoint import load_checkpoint
from potluck.errors import ERROR_PREFIX
from potluck.lab.children import start_child
from potluck.protocol.config_files import load_run_config
from potluck.tasks import run_task
from potluck.tasks.byte_tokenizer import byte_tokenizer_json
from potluck.training.diloco import load_params
from tests.integration.swarm_helpers import Node, Nodes, _pump, p2pd_pids, wait_until

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DIGITS = "examples.digits.digits_task:DigitsTask"  # importable from the repository's root, as tests run


def _swarm(tmp_path: Path, *args: str) -> dict[str, object]:
    before = p2pd_pids()
    command = [sys.executable, "-m", "potluck", "swarm", "--peers", "2", "--http-port", "0", "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    wait_until(lambda: not (p2pd_pids() - before), timeout_s=20, what="the swarm's daemons to exit")
    return json.loads(done.stdout)


@pytest.mark.timeout(240)
def test_a_task_of_ones_own_trains_in_a_swarm_well_past_chance(tmp_path: Path) -> None:
    # Execute: a digits classifier, a module outside the package, named by --task
    state = tmp_path / "aggregator"
    result = _swarm(tmp_path, "--task", DIGITS, "--rounds", "8", "--local-steps", "20", "--state-dir", str(state))
    # Assert: the held-out loss falls far below chance's ln(10), and the kept state classifies well
    assert result["rounds_completed"] == 8
    assert result["initial_val_loss"] > 2.0 and result["final_val_loss"] < 0.6, result["final_val_loss"]
    cfg = load_run_config(state / "run.toml")
    checkpoint = load_checkpoint(state, config_hash=cfg.config_hash)
    assert checkpoint is not None and cfg.task.name == DIGITS
    sys.path.insert(0, str(ROOT))
    from examples.digits.digits_task import DigitsTask

    task = DigitsTask()
    model = task.build_model(seed=cfg.seed)
    load_params(model, checkpoint.params)
    assert task.accuracy(model) > 0.85  # chance: 0.1
    assert result["state_dir"] == str(state)
    # the model out: its weights as safetensors, and what they are
    out = tmp_path / "exported"
    _potluck("export", "--state-dir", str(state), "--out", str(out), "--task", DIGITS)
    about = json.loads((out / "potluck.json").read_text())
    assert about["task"] == DIGITS and about["round"] == 8
    assert set(load_file(out / "model.safetensors")) == set(checkpoint.params)


@pytest.mark.timeout(300)
def test_a_hugging_face_llama_with_its_own_tokenizer_trains_in_a_swarm_and_comes_out_for_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a BPE tokenizer trained here, and the example's Llama config with its vocabulary
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "cache"))  # this machine's store (the nodes inherit it)
    _potluck("tokenizer", "train", "--vocab-size", "512", "--max-bytes", "1000000", "--out", f"{tmp_path}/tok.json")
    model = {**json.loads((ROOT / "examples" / "llama" / "config.json").read_text()), "vocab_size": 512}
    (tmp_path / "model.json").write_text(json.dumps(model))
    run = (ROOT / "examples" / "llama" / "run.toml").read_text().replace('"config.json"', '"model.json"')
    (tmp_path / "run.toml").write_text(run.replace('source = "builtin"', 'source = "builtin"\ntokenizer = "tok.json"'))
    # Execute: a transformers LlamaForCausalLM, two peers and an aggregator as processes
    state, out = tmp_path / "aggregator", tmp_path / "exported"
    flags = ("--config", str(tmp_path / "run.toml"), "--rounds", "4", "--local-steps", "15", "--state-dir", str(state))
    result = _swarm(tmp_path, *flags)
    _, sampled = _potlucks(  # at once: each is mostly its own imports of torch and transformers
        ("export", "--state-dir", str(state), "--out", str(out)),
        ("sample", "--state-dir", str(state), "--prompt", "def ", "--tokens", "40"),
    )
    # Assert: it learned
    assert result["rounds_completed"] == 4
    assert result["initial_val_loss"] > math.log(512) - 0.5
    assert result["final_val_loss"] < result["initial_val_loss"] - 1.0, result["final_val_loss"]
    assert sampled.startswith("def ") and len(sampled) > 10
    # and transformers alone, in a fresh process, loads the export and gives the checkpoint's logits
    cfg = load_run_config(state / "run.toml")
    checkpoint = load_checkpoint(state, config_hash=cfg.config_hash)
    assert checkpoint is not None
    task = run_task(cfg)
    model = task.build_model(seed=cfg.seed)
    load_params(model, checkpoint.params)
    text = "import os\nimport sys\n"
    with torch.no_grad():
        expected = task.logits(model.eval(), torch.tensor([task.encode(text)]))  # type: ignore[attr-defined]
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[2], return_tensors='pt').input_ids\n"
        "with torch.no_grad(): torch.save(model(ids).logits, sys.argv[3])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    logits = tmp_path / "logits.pt"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out), text, str(logits)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.allclose(torch.load(logits), expected, atol=1e-5)


def _potluck(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "potluck", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _potlucks(*commands: tuple[str, ...]) -> list[str]:
    """Several `potluck` commands run side by side; each one's stdout, once all have exited with 0."""
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "potluck", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in commands
    ]
    return [stdout for stdout, _ in _exited(started, code=0, timeout_s=120)]


def _exited(started: list[subprocess.Popen[str]], *, code: int, timeout_s: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of each started process, once each has exited with `code`; none outlives the call."""
    outputs = []
    try:
        for process in started:
            stdout, stderr = process.communicate(timeout=timeout_s)
            assert process.returncode == code, (process.returncode, stderr[-3000:])
            outputs.append((stdout, stderr))
    finally:
        for process in started:
            process.kill()
            process.wait()
    return outputs


def _refused_peers(tmp_path: Path, join: str, cases: list[tuple[str, tuple[str, ...], Path]]) -> list[tuple[str, str]]:
    """Peers started at once, each in its own directory (what it can import); (last stderr line, stdout) of each.

    Each must exit with 2, the status of a one-line error.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what its own directory holds
    started = []
    for name, args, cwd in cases:
        command = [sys.executable, "-m", "potluck", *_peer_args(tmp_path, name, join), "--threads", "1", "--json"]
        started.append(
            subprocess.Popen(
                [*command, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return [(stderr.strip().splitlines()[-1], stdout) for stdout, stderr in _exited(started, code=2, timeout_s=150)]


@pytest.mark.timeout(300)
def test_a_volunteer_who_cannot_train_the_runs_task_is_refused_in_one_line_before_training(
    nodes: Nodes, tmp_path: Path
) -> None:
    # Prepare: the operator's directory holds the run's task module; another volunteer's builds a wider network
    source = (ROOT / "examples" / "digits" / "digits_task.py").read_text()
    operator, other, empty = tmp_path / "operator", tmp_path / "other", tmp_path / "empty"
    for directory, module in ((operator, source), (other, source.replace("hidden: int = 64", "hidden: int = 32"))):
        directory.mkdir()
        (directory / "their_digits.py").write_text(module)
    empty.mkdir()
    task = "their_digits:DigitsTask"
    # a refused joiner had asked for the state, so its round waits for it until the (short) deadline
    flags = ("--task", task, "--state-dir", "state", "--set", "round_deadline_s=6", "--set", "local_steps=10")
    aggregator = _node_in(nodes, operator, "aggregator", "aggregator", *flags)
    join = aggregator.next_event(lambda e: e.get("event") == "ready", timeout_s=90)["maddrs"][0]
    # Execute and assert: each refusal is one line, and the peer never synced nor trained
    tokenizer = tmp_path / "tokenizer.json"  # a volunteer brings a tokenizer to a run that has none
    tokenizer.write_text(byte_tokenizer_json())
    cases = [
        ("unnamed", (), operator),
        ("missing", ("--task", task), empty),
        ("wider", ("--task", task), other),
        ("tokenizer", ("--task", task, "--tokenizer", str(tokenizer)), operator),
    ]
    problems = [
        f"pass --task {task}",
        "cannot import their_digits here",
        "builds another architecture than the run's",
        "is another tokenizer than the run's (bytes, no tokenizer file)",
    ]
    for (line, stdout), problem in zip(_refused_peers(tmp_path, join, cases), problems, strict=True):
        assert problem in line and line.startswith(ERROR_PREFIX), line
        assert not any(json.loads(e).get("event") in ("synced", "round") for e in stdout.splitlines()), stdout
    # nothing of the run is touched: a volunteer who has the task trains and is credited
    good = _node_in(nodes, operator, "good", *_peer_args(tmp_path, "good", join), "--task", task, "--max-rounds", "1")
    first = good.next_event(lambda e: e.get("event") == "round", timeout_s=120)
    assert first["accepted"], first
    assert good.wait_exit(timeout_s=60) == 0


def _peer_args(tmp_path: Path, name: str, join: str) -> list[str]:
    return ["peer", "--join", join, "--identity", str(tmp_path / f"{name}.key"), "--receipts", str(tmp_path / name)]


def _node_in(nodes: Nodes, cwd: Path, name: str, *args: str) -> Node:
    """A node run in `cwd` (a plain process: `python -m` puts that directory on its import path); `nodes` stops it."""
    child = start_child(
        name,
        [*args, "--threads", "1", "--json"],
        work_dir=nodes.work_dir,
        threads=1,
        wrap=lambda argv: ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *argv],
    )
    node = Node(child=child)
    threading.Thread(target=_pump, args=(child, node.events), daemon=True).start()
    nodes.started.append(node)
    return node
