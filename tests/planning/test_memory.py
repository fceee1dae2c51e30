"""The peak-memory estimate of `potluck plan --memory`: its arithmetic, and the model shapes it is fed."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from potluck.cli.app import app
from potluck.cli.common import UsageError
from potluck.planning.memory import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    HFConfigError,
    ModelShape,
    TrainingSetup,
    estimate_memory,
    fits,
    gpt_shape,
    hf_shape,
    load_hf_config,
)
from potluck.training.models import MODEL_SIZES, count_params

SHAPE = ModelShape(
    name="test",
    family="gpt",
    n_layer=6,
    hidden=384,
    n_head=6,
    n_kv_head=6,
    ffn=1536,
    vocab=256,
    seq=256,
    params=10_000_000,
    largest_param=589_824,
)
RUNNER = CliRunner()
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_peak_grows_with_the_micro_batch(device: str) -> None:
    peaks = [
        estimate_memory(SHAPE, TrainingSetup(micro_batch=b, device=device)).device_bytes  # type: ignore[arg-type]
        for b in (1, 2, 4, 8, 16, 64)
    ]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]


def test_checkpointing_keeps_fewer_activations() -> None:
    plain = estimate_memory(SHAPE, TrainingSetup(micro_batch=16))
    saved = estimate_memory(SHAPE, TrainingSetup(micro_batch=16, activation_checkpointing=True))
    assert saved.sizes.activations < plain.sizes.activations / 3
    assert saved.device_bytes < plain.device_bytes


def test_outer_state_on_the_cpu_moves_its_bytes_to_the_host() -> None:
    on_device = estimate_memory(SHAPE, TrainingSetup(micro_batch=8))
    on_host = estimate_memory(SHAPE, TrainingSetup(micro_batch=8, outer_state_on_cpu=True))

    assert on_device.host_bytes == 0 and on_device.at_peak.outer_state == on_device.sizes.outer_state > 0
    assert on_host.at_peak.outer_state == 0 and on_host.at_peak.round_end == 0
    assert on_host.host_bytes == on_host.sizes.outer_state + on_host.sizes.round_end
    assert on_host.device_bytes <= on_device.device_bytes - on_device.sizes.outer_state


def test_on_a_cpu_everything_is_host_memory_whatever_the_flag() -> None:
    setup = TrainingSetup(micro_batch=8, device="cpu", outer_state_on_cpu=True)
    estimate = estimate_memory(SHAPE, setup)
    assert estimate.host_bytes == 0 and estimate.at_peak.outer_state > 0
    assert not setup.autocast and TrainingSetup(micro_batch=8, device="cuda").autocast


def test_per_parameter_terms_follow_the_peer_state() -> None:
    p = SHAPE.params
    nesterov = estimate_memory(SHAPE, TrainingSetup(micro_batch=1)).sizes
    average = estimate_memory(SHAPE, TrainingSetup(micro_batch=1, outer_momentum=False)).sizes
    assert (nesterov.parameters, nesterov.gradients, nesterov.optimizer) == (4 * p, 4 * p, 8 * p)
    # master copy, outer momentum, round base and residual; averaging keeps no momentum
    assert (nesterov.outer_state, average.outer_state) == (16 * p, 12 * p)
    assert nesterov.round_end == 20 * p


def test_the_rows_at_the_peak_add_up_to_it() -> None:
    for b in (1, 8, 64):
        estimate = estimate_memory(SHAPE, TrainingSetup(micro_batch=b, device="cpu"))
        assert sum(estimate.at_peak.rows().values()) == estimate.device_bytes
        assert all(estimate.at_peak.rows()[k] <= v for k, v in estimate.sizes.rows().items())


def test_activations_of_the_gpt_in_fp32_are_sixteen_hidden_vectors_per_token_and_layer() -> None:
    sb, h = 8 * 256, SHAPE.hidden
    estimate = estimate_memory(SHAPE, TrainingSetup(micro_batch=8, device="cpu"))
    # 16 h-wide fp32 values per token and layer, a log-sum-exp per head, and ln_f's input and output
    assert estimate.sizes.activations == 6 * sb * (16 * h * 4 + 6 * 4) + sb * 2 * h * 4


def test_a_large_vocabulary_moves_the_peak_into_the_logits() -> None:
    wide = ModelShape(**{**_fields(SHAPE), "vocab": 150_000})
    estimate = estimate_memory(wide, TrainingSetup(micro_batch=8, device="cpu"))
    assert estimate.phase == "backward"
    assert estimate.at_peak.logits == 8 * 256 * 150_000 * 16  # logits, log-softmax and both gradients, fp32


def test_fits_keeps_headroom_and_the_runtime() -> None:
    estimate = estimate_memory(SHAPE, TrainingSetup(micro_batch=8))
    assert estimate.runtime == CUDA_CONTEXT_BYTES
    assert estimate_memory(SHAPE, TrainingSetup(micro_batch=8, device="cpu")).runtime == CPU_RUNTIME_BYTES
    assert fits(estimate, device_memory_bytes=24 * 2**30)
    assert not fits(estimate, device_memory_bytes=estimate.device_bytes)
    assert fits(estimate, device_memory_bytes=int((estimate.device_bytes + CUDA_CONTEXT_BYTES) / 0.9) + 1)


def test_checkpointing_rebuilds_one_layer_after_the_logits_are_freed() -> None:
    wide = ModelShape(**{**_fields(SHAPE), "vocab": 150_000})
    estimate = estimate_memory(wide, TrainingSetup(micro_batch=8, device="cpu", activation_checkpointing=True))
    kept = 6 * 8 * 256 * 384 * 4 + 8 * 256 * 2 * 384 * 4  # each layer's input, ln_f's input and output
    assert estimate.phase == "backward" and estimate.at_peak.activations == kept < estimate.sizes.activations


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_built_in_shapes_count_the_parameters_as_the_model_does(size: str) -> None:
    shape = gpt_shape(MODEL_SIZES[size], name=size)
    assert shape.params == count_params(MODEL_SIZES[size])
    assert (shape.n_layer, shape.hidden, shape.seq, shape.vocab) == (
        MODEL_SIZES[size].n_layer,
        MODEL_SIZES[size].n_embd,
        MODEL_SIZES[size].block_size,
        256,
    )


@pytest.mark.parametrize("tied", [False, True])
def test_hf_meta_count_equals_a_real_build(tied: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**TINY_LLAMA, "tie_word_embeddings": tied}
    shape = hf_shape(settings, name="tiny llama")
    fields = dict(settings)
    real = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert shape.largest_param == max(p.numel() for p in real.parameters())
    assert (shape.family, shape.n_kv_head, shape.ffn, shape.seq) == ("llama", 2, 64, 64)
    assert not any(p.device == torch.device("meta") for p in real.parameters())


def test_hf_shape_never_opens_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("hf_shape tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert hf_shape({**TINY_LLAMA, "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4}).family == "gpt"


def test_unusable_hf_configs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(HFConfigError, match="model_type"):
        hf_shape({"hidden_size": 32})
    with pytest.raises(HFConfigError, match="cannot build"):
        hf_shape({"model_type": "no-such-architecture"})
    with pytest.raises(HFConfigError, match="no such file"):
        load_hf_config(tmp_path / "missing.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(HFConfigError, match="one JSON object"):
        load_hf_config(tmp_path)


def _plan(*args: str) -> Result:
    return RUNNER.invoke(app, ["plan", "--memory", *args])


def test_plan_memory_json_for_a_built_in_size() -> None:
    result = _plan("--size", "124m", "--micro-batch", "4", "--device-memory", "24", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"model", "setup", "estimate", "device_memory_bytes", "fits"}
    assert out["model"]["params"] == count_params(MODEL_SIZES["124m"])
    assert out["setup"]["micro_batch"] == 4 and out["setup"]["bf16_autocast"] is True
    estimate = out["estimate"]
    assert set(estimate) >= {"sizes", "at_peak", "phase", "device_bytes", "host_bytes"}
    assert set(estimate["sizes"]) == {
        "parameters",
        "gradients",
        "optimizer",
        "outer_state",
        "round_end",
        "activations",
        "logits",
        "workspace",
    }
    assert out["device_memory_bytes"] == 24 * 2**30 and out["fits"] is True


def test_plan_memory_reads_a_hugging_face_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    result = _plan("--hf-config", str(tmp_path / "config.json"), "--device", "cpu", "--outer-on-cpu")
    assert result.exit_code == 0, result.output
    assert "config.json" in result.stdout and "peak" in result.stdout


def test_plan_memory_refuses_an_unknown_size() -> None:
    result = _plan("--size", "7b")
    assert isinstance(result.exception, UsageError)  # the console script prints it as one line and exits 2
    assert "7b" in str(result.exception) and "\n" not in str(result.exception)


def _fields(shape: ModelShape) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(shape)
