"""The task seam: built-in and Hugging Face tasks, a volunteer's own, the run's fingerprint and its checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from potluck.protocol.config import ConfigError, RunConfig
from potluck.protocol.config_files import dump_run_config, load_run_config, run_config_from_toml
from potluck.tasks import Task, TaskError, TaskMismatch, allow_task, created, run_task, task_for
from potluck.tasks.gpt import GPTTask
from potluck.tasks.hf import HFCausalLMTask
from potluck.training.diloco import inner_step, split_batch
from potluck.training.models import build_model, model_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LLAMA = json.loads((EXAMPLES / "llama" / "config.json").read_text())
SMALL = {"data.max_bytes": 200_000, "model.block_size": 32}


def hf_run(**config: object) -> RunConfig:
    return RunConfig().with_overrides(
        {**SMALL, "task.name": "hf-causal-lm", "task.hf_config": {**LLAMA, **config}}, source="test"
    )


def test_the_default_task_is_the_built_in_gpt_with_its_usual_weights() -> None:
    cfg = RunConfig().with_overrides(SMALL, source="test")
    task = task_for(cfg)
    assert isinstance(task, GPTTask)
    model = task.build_model(seed=3)
    same = build_model(model_config(cfg.model.size, block_size=32), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters(), strict=True))
    assert list(task.parameter_shapes()) == [name for name, _ in model.named_parameters()]
    x, y = next(task.train_batches(seed=1, batch_size=2))
    assert task.work((x, y)) == 2 * 32 == task.most_work(batch_size=2)
    assert torch.isclose(task.loss(model, (x, y)), model(x, y)[1])


def test_an_hf_causal_lm_is_built_from_its_config_the_same_from_the_same_seed() -> None:
    task = task_for(hf_run())
    assert isinstance(task, HFCausalLMTask) and task.block_size == 32
    first, again, other = (task.build_model(seed=s) for s in (5, 5, 6))
    assert type(first).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))
    batch = next(task.train_batches(seed=0, batch_size=2))
    assert 5.0 < task.loss(first, batch).item() < 6.5  # about ln(256): an untrained model guesses
    assert task.fingerprint() == task_for(hf_run()).fingerprint() != task_for(hf_run(hidden_size=128)).fingerprint()


@pytest.mark.parametrize(
    ("config", "problem"),
    [({"vocab_size": 100}, "vocab_size is 100"), ({"model_type": "no-such-model"}, "does not describe")],
)
def test_an_unusable_hf_config_is_one_line(config: dict[str, object], problem: str) -> None:
    with pytest.raises(TaskError, match=problem) as caught:
        task_for(hf_run(**config))
    assert "\n" not in str(caught.value)


def test_an_hf_config_survives_the_toml_round_trip_exactly_nulls_included(tmp_path: Path) -> None:
    cfg = hf_run(rope_scaling=None, pad_token_id=None)
    path = tmp_path / "run.toml"
    path.write_text(dump_run_config(cfg, "toml"))
    assert load_run_config(path).config_hash == cfg.config_hash
    assert cfg.task.hf_config_values()["rope_scaling"] is None


def test_a_config_json_path_is_read_where_the_run_is_loaded_and_never_from_the_network(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text(json.dumps(LLAMA))
    (tmp_path / "run.toml").write_text('[task]\nname = "hf-causal-lm"\nhf_config = "model.json"\n')
    cfg = load_run_config(tmp_path / "run.toml")
    assert cfg.task.hf_config_values() == LLAMA
    with pytest.raises(ConfigError, match="config.json file"):  # a state's config may not name local files
        run_config_from_toml('[task]\nname = "hf-causal-lm"\nhf_config = "/etc/passwd"\n', source="state payload")
    (tmp_path / "missing.toml").write_text('[task]\nname = "hf-causal-lm"\nhf_config = "nope.json"\n')
    with pytest.raises(ConfigError, match="no such file nope.json"):
        load_run_config(tmp_path / "missing.toml")


def test_hf_config_goes_with_the_hf_task_only() -> None:
    with pytest.raises(ConfigError, match="exactly when"):
        RunConfig().with_overrides({"task.hf_config": LLAMA}, source="test")
    with pytest.raises(ConfigError, match="task.name"):
        RunConfig().with_overrides({"task.name": "not a module path"}, source="test")


def test_a_new_run_records_its_architecture_and_a_different_build_is_refused() -> None:
    cfg = created(RunConfig().with_overrides(SMALL, source="test"))
    assert cfg.task.fingerprint == task_for(cfg).fingerprint()
    assert created(cfg) == cfg  # creating again changes nothing
    other = cfg.with_overrides({"task.fingerprint": "0" * 64}, source="test")
    with pytest.raises(TaskMismatch, match="another architecture"):
        run_task(other)
    with pytest.raises(TaskMismatch, match="changed since the run was created"):
        created(other)


class Constant(Task):
    """The smallest task of one's own: learn a constant."""

    def __init__(self, width: int = 3) -> None:
        self.width = width

    def build_model(self, *, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Linear(1, self.width)

    def train_batches(self, *, seed: int, batch_size: int):  # type: ignore[no-untyped-def]
        while True:
            yield torch.ones(batch_size, 1)

    def held_out_batches(self, *, batch_size: int, count: int) -> list[torch.Tensor]:
        return [torch.ones(batch_size, 1)] * count

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return (model(batch) - 1).pow(2).mean()


NOT_A_TASK = 42


def test_a_task_of_ones_own_is_imported_only_when_this_node_named_it() -> None:
    cfg = RunConfig().with_overrides({"task.name": f"{__name__}:Constant", "task.params": {"width": 5}}, source="t")
    with pytest.raises(TaskError, match=f"pass --task {__name__}:Constant"):
        task_for(cfg)
    allow_task(f"{__name__}:Constant")
    task = task_for(cfg)
    assert isinstance(task, Constant) and task.width == 5
    assert task.parameter_shapes() == {"weight": (5, 1), "bias": (5,)}
    assert task.work(torch.ones(7, 1)) == 7 == task.most_work(batch_size=7)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("no_such_package_here.tasks:Task", "cannot import no_such_package_here.tasks here"),
        (f"{__name__}:Missing", "has no attribute Missing"),
        (f"{__name__}:NOT_A_TASK", "not a Task or a callable"),
    ],
)
def test_a_task_that_does_not_import_is_one_line(name: str, problem: str) -> None:
    allow_task(name)
    with pytest.raises(TaskError, match=problem) as caught:
        task_for(RunConfig().with_overrides({"task.name": name}, source="test"))
    assert "\n" not in str(caught.value)


def test_building_an_hf_model_never_touches_the_network() -> None:
    # Every socket connection attempt in a fresh interpreter fails loudly; the task still builds and scores.
    code = f"""
import socket, json
def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
from potluck.protocol.config import RunConfig
from potluck.tasks import task_for
hf = json.loads({json.dumps(json.dumps(LLAMA))})
cfg = RunConfig().with_overrides(
    {{"task.name": "hf-causal-lm", "task.hf_config": hf, "data.max_bytes": 100000, "model.block_size": 16}}, source="t"
)
task = task_for(cfg)
model = task.build_model(seed=0)
print(task.loss(model, task.held_out_batches(batch_size=2, count=1)[0]).item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) > 0


@pytest.mark.parametrize("run", [RunConfig().with_overrides(SMALL, source="test"), hf_run()], ids=["gpt", "llama"])
def test_micro_batches_and_checkpointing_take_the_same_step_in_less_memory(run: RunConfig) -> None:
    task = task_for(run)
    batch = next(task.train_batches(seed=0, batch_size=4))
    steps = []
    for micro_batch, checkpointing in ((None, False), (1, False), (3, True)):
        model = task.build_model(seed=0)
        if checkpointing:
            task.enable_checkpointing(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = inner_step(model, optimizer, batch, lr=0.1, loss_of=task.loss, micro_batch=micro_batch)
        steps.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss, params), *others = steps
    for other_loss, other_params in others:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params, other_params, strict=True))


def test_a_batch_is_cut_along_its_first_dimension_whatever_its_structure() -> None:
    batch = {"x": torch.arange(10).view(5, 2), "y": (torch.arange(5), torch.arange(5) * 2)}
    pieces = split_batch(batch, 2)
    assert [size for size, _ in pieces] == [2, 2, 1]
    assert torch.equal(pieces[2][1]["x"], torch.tensor([[8, 9]]))
    assert torch.equal(pieces[1][1]["y"][1], torch.tensor([4, 6]))
    assert split_batch(batch, None) == [(5, batch)] and split_batch(batch, 9) == [(5, batch)]


def test_a_runs_tokenizer_travels_with_its_state_to_a_machine_that_lacks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the operator's machine has the tokenizer (the run names it by its hash); the volunteer's does not
    from potluck.protocol.file_store import TOKENIZERS, stored
    from potluck.protocol.messages import MessageError, decode_state_payload, encode_state_payload
    from potluck.training.tokenizer import train_tokenizer

    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "operator"))
    (tmp_path / "tokenizer.json").write_bytes(train_tokenizer(["def f(x):\n    return x\n"] * 50, vocab_size=300))
    (tmp_path / "model.json").write_text(json.dumps({**LLAMA, "vocab_size": 300}))
    (tmp_path / "run.toml").write_text(
        '[task]\nname = "hf-causal-lm"\nhf_config = "model.json"\n[data]\ntokenizer = "tokenizer.json"\n'
    )
    cfg = load_run_config(tmp_path / "run.toml")
    params = {name: torch.zeros(shape) for name, shape in task_for(cfg).parameter_shapes().items()}
    payload = encode_state_payload(cfg, params=params, outer_state={})
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "volunteer"))
    assert stored(TOKENIZERS, str(cfg.data.tokenizer)) is None
    # Execute
    _, _, _, tokenizer = decode_state_payload(payload)
    # Assert: it is the file the config names, and a state whose file is another is refused
    assert tokenizer == (tmp_path / "tokenizer.json").read_bytes()
    other = cfg.with_overrides({"data.tokenizer": "0" * 64}, source="test")
    with pytest.raises(MessageError, match="not the one its config names"):
        decode_state_payload(payload.replace(cfg.data.tokenizer.encode(), other.data.tokenizer.encode()))


def test_the_built_in_gpt_refuses_a_tokenizer_in_one_line() -> None:
    cfg = RunConfig().with_overrides({"data.tokenizer": "a" * 64}, source="test")
    with pytest.raises(TaskError, match="reads bytes"):
        task_for(cfg)


def test_a_volunteer_who_brings_another_tokenizer_is_refused_and_the_runs_own_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two tokenizers; a run that names the first, and one that uses bytes
    from potluck.tasks import check_tokenizer
    from potluck.tasks.tokens import brought_tokenizer
    from potluck.training.tokenizer import train_tokenizer

    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "cache"))
    for name, text in (("ours.json", "def f(x):\n    return x\n"), ("theirs.json", "SELECT * FROM t;\n")):
        (tmp_path / name).write_bytes(train_tokenizer([text] * 50, vocab_size=300))
    ours, theirs = brought_tokenizer(tmp_path / "ours.json"), brought_tokenizer(tmp_path / "theirs.json")
    run = RunConfig().with_overrides({"data.tokenizer": ours}, source="test")
    # Execute and assert: the run's own tokenizer, or none brought, passes; another, or any against bytes, does not
    check_tokenizer(run, ours)
    check_tokenizer(run, None)
    with pytest.raises(TaskMismatch, match=rf"another tokenizer than the run's \(sha256 {ours[:12]}\)"):
        check_tokenizer(run, theirs)
    with pytest.raises(TaskMismatch, match=r"\(bytes, no tokenizer file\)"):
        check_tokenizer(RunConfig(), ours)


@pytest.mark.parametrize(
    ("content", "problem"), [(None, "does not exist"), (b"{not json", "not a valid tokenizer.json")]
)
def test_a_tokenizer_a_volunteer_brings_that_is_not_one_is_one_line(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    from potluck.tasks.tokens import brought_tokenizer
    from potluck.training.tokenizer import TokenizerError

    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=problem):
        brought_tokenizer(path)
