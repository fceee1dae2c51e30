"""A run created with task.init_from starts from those weights: a safetensors file or a save_pretrained directory."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from potluck.aggregator_server.checkpoint import Checkpoint, save_checkpoint
from potluck.aggregator_server.master import initial_master
from potluck.aggregator_server.setup import RUN_FILE, prepare_run
from potluck.cli.export import export
from potluck.errors import PotluckError
from potluck.protocol.config import ConfigError, RunConfig
from potluck.protocol.config_files import dump_run_config, load_run_config, run_config_from_toml
from potluck.protocol.file_store import WEIGHTS, StoreError, cache_dir
from potluck.protocol.identity import generate_identity
from potluck.tasks import InitWeightsError, created, task_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LLAMA = json.loads((EXAMPLES / "llama" / "config.json").read_text())
AGGREGATOR = generate_identity()
SMALL = "[model]\nblock_size = 32\n[data]\nmax_bytes = 200000\n"


@pytest.fixture(autouse=True)
def _own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTLUCK_CACHE", str(tmp_path / "cache"))  # this machine's store, empty


def _run_toml(folder: Path, *, init_from: str, hf_config: str | None = None) -> Path:
    """A run.toml in `folder` that starts from `init_from` (a GPT run, or hf-causal-lm with `hf_config`)."""
    task = f'name = "hf-causal-lm"\nhf_config = "{hf_config}"\n' if hf_config is not None else ""
    path = folder / "run.toml"
    path.write_text(f'run_name = "init"\n[task]\n{task}init_from = "{init_from}"\n{SMALL}')
    return path


def _random_like(cfg: RunConfig, seed: int) -> dict[str, torch.Tensor]:
    """Parameters of the run's model shapes, drawn from `seed`: weights no seed of the task's own would give."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in task_for(cfg).parameter_shapes().items()}


def _assert_same(params: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(params) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(params[name], tensor), name


def _one_line(error: BaseException) -> str:
    assert isinstance(error, PotluckError) and "\n" not in str(error)
    return str(error)


def test_a_run_created_from_a_safetensors_file_starts_from_exactly_those_weights(tmp_path: Path) -> None:
    # Prepare: weights for the built-in GPT, saved under the model's own names
    plain = load_run_config(_run_toml(tmp_path, init_from="none"))
    weights = _random_like(plain, seed=7)
    save_file(weights, str(tmp_path / "start.safetensors"))
    # Execute
    cfg = created(load_run_config(_run_toml(tmp_path, init_from="start.safetensors")))
    master = initial_master(cfg)
    # Assert: the config records the file's sha256 (its hash covers it, a dump keeps it), round 0 is those weights
    assert cfg.task.init_from == hashlib.sha256((tmp_path / "start.safetensors").read_bytes()).hexdigest()
    assert cfg.config_hash != created(plain).config_hash
    assert run_config_from_toml(dump_run_config(cfg), source="dump").config_hash == cfg.config_hash
    _assert_same(master.params, weights)
    seeds = initial_master(created(plain)).params  # no init_from: the seed's weights, as before
    assert not any(torch.equal(seeds[name], weights[name]) for name in weights)


@pytest.mark.parametrize("task", ["gpt", "hf-causal-lm"])
def test_potluck_export_then_init_from_gives_the_same_weights(tmp_path: Path, task: str) -> None:
    # Prepare: an aggregator's state directory at round 2 with weights of its own, exported as a user would
    hf = task == "hf-causal-lm"
    (tmp_path / "model.json").write_text(json.dumps(LLAMA))
    first = load_run_config(_run_toml(tmp_path, init_from="none", hf_config="model.json" if hf else None))
    state = tmp_path / "state"
    cfg = prepare_run(state_dir=state, config=first, identity=AGGREGATOR)
    trained = _random_like(cfg, seed=3)
    run = cfg.config_hash
    save_checkpoint(
        state,
        Checkpoint(
            round=2, version=2, params=trained, outer_state={}, residual={}, last_aggregate=b"", config_hash=run
        ),
    )
    export(state_dir=state, out=tmp_path / "exported")
    # Execute: a new run from the export (a save_pretrained directory for hf-causal-lm: its config.json as well)
    hf_config = "exported/config.json" if hf else None
    again = created(load_run_config(_run_toml(tmp_path, init_from="exported", hf_config=hf_config)))
    # Assert
    assert again.task.fingerprint == cfg.task.fingerprint
    _assert_same(initial_master(again).params, trained)


@pytest.mark.parametrize(("tied", "shard_bytes"), [(True, None), (False, 40_000)])
def test_a_save_pretrained_llama_loads_tied_or_sharded(tmp_path: Path, tied: bool, shard_bytes: int | None) -> None:
    # Prepare: a transformers Llama saved as transformers saves it (a tied lm_head once; shards and an index)
    (tmp_path / "model.json").write_text(json.dumps({**LLAMA, "tie_word_embeddings": tied}))
    plain = load_run_config(_run_toml(tmp_path, init_from="none", hf_config="model.json"))
    model = task_for(plain).build_model(seed=11)
    model.save_pretrained(str(tmp_path / "llama"), max_shard_size=shard_bytes or "5GB")  # type: ignore[operator]
    saved = {name: t.detach().clone() for name, t in model.named_parameters()}
    sharded = (tmp_path / "llama" / "model.safetensors.index.json").exists()
    # Execute
    cfg = created(load_run_config(_run_toml(tmp_path, init_from="llama", hf_config="model.json")))
    again = load_run_config(tmp_path / "run.toml")
    # Assert: exactly the saved weights, not the run's seed's; a sharded directory hashes the same each time
    assert sharded == (shard_bytes is not None)
    assert tied == ("lm_head.weight" not in load_file(str(cache_dir() / WEIGHTS / str(cfg.task.init_from))))
    _assert_same(initial_master(cfg).params, saved)
    assert again.task.init_from == cfg.task.init_from


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda w: w.pop("lm_head.weight"), "lack 1 of the model's tensors (lm_head.weight)"),
        (lambda w: w.update({"lm_head.weight": torch.zeros(3, 64)}), "tensor lm_head.weight has shape [3, 64]"),
        (lambda w: w.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}), "model.layers.9.mlp.up_proj"),
    ],
    ids=["missing", "misshaped", "another-architecture"],
)
def test_weights_that_do_not_fit_are_refused_in_one_line_before_the_run_exists(
    tmp_path: Path, change: object, named: str
) -> None:
    # Prepare
    (tmp_path / "model.json").write_text(json.dumps(LLAMA))
    plain = load_run_config(_run_toml(tmp_path, init_from="none", hf_config="model.json"))
    weights = {name: t.detach().clone() for name, t in task_for(plain).build_model(seed=0).named_parameters()}
    change(weights)  # type: ignore[operator]
    save_file(weights, str(tmp_path / "bad.safetensors"))
    cfg = load_run_config(_run_toml(tmp_path, init_from="bad.safetensors", hf_config="model.json"))
    # Execute
    with pytest.raises(InitWeightsError) as caught:
        prepare_run(state_dir=tmp_path / "state", config=cfg, identity=AGGREGATOR)
    # Assert
    assert named in _one_line(caught.value)
    assert not (tmp_path / "state" / RUN_FILE).exists()


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"), "w is not a safetensors file"),
        (lambda p: p.write_bytes(_truncated()), "w is not a safetensors file"),
        (lambda p: p.mkdir(), "w holds no model.safetensors or model.safetensors.index.json"),
        (lambda p: None, "no such file w"),
    ],
    ids=["garbage", "truncated", "empty-directory", "missing"],
)
def test_an_unreadable_init_from_is_one_line_when_the_run_is_loaded(
    tmp_path: Path, write: object, problem: str
) -> None:
    write(tmp_path / "w")  # type: ignore[operator]
    with pytest.raises(ConfigError) as caught:
        load_run_config(_run_toml(tmp_path, init_from="w"))
    assert f"task.init_from: {problem}" in _one_line(caught.value)


def _truncated() -> bytes:
    """A safetensors file cut short: its header promises more bytes than it holds."""
    from safetensors.torch import save

    return save({"x": torch.zeros(64)})[:-16]


def test_stored_weights_that_changed_or_are_missing_stop_the_run_in_one_line(tmp_path: Path) -> None:
    # Prepare
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    cfg = load_run_config(_run_toml(tmp_path, init_from="w.safetensors"))
    stored = cache_dir() / WEIGHTS / str(cfg.task.init_from)
    # Execute + Assert: a changed file, then none
    stored.write_bytes(stored.read_bytes() + b" ")
    with pytest.raises(StoreError) as changed:
        initial_master(cfg)
    stored.unlink()
    with pytest.raises(StoreError) as missing:
        created(cfg)
    assert "changed since it was stored" in _one_line(changed.value)
    assert "holds no weight" in _one_line(missing.value) and "init_from = PATH" in str(missing.value)
    stored.write_bytes(b"not the weights")  # and loading the run again, as the fix says, repairs the store
    assert load_run_config(tmp_path / "run.toml").task.init_from == stored.name
    assert stored.read_bytes() == (tmp_path / "w.safetensors").read_bytes()


def test_a_config_from_the_network_never_names_a_local_file(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="task.init_from: must be a sha256"):
        run_config_from_toml(f'[task]\ninit_from = "{tmp_path / "w.safetensors"}"\n', source="state payload")
    assert not (cache_dir() / WEIGHTS).exists()
