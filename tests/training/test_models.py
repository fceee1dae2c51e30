"""The built-in GPT: sizes, causality, initial loss, seeded init, and that it can learn."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from potluck.training.models import GPT, MODEL_SIZES, GPTConfig, build_model, count_params, model_config


def test_size_names() -> None:
    assert list(MODEL_SIZES) == ["tiny", "small", "10m", "124m", "350m", "1b"]


def test_tiny_and_10m_param_counts() -> None:
    tiny = build_model("tiny", seed=0)
    assert tiny.num_params() < 1_000_000
    assert tiny.num_params() == count_params(tiny.config)
    assert 8_000_000 <= count_params(model_config("10m")) <= 12_000_000


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_count_params_matches_a_meta_build(size: str) -> None:
    # The meta device allocates nothing, so even "1b" costs no memory here.
    for config in (MODEL_SIZES[size], dataclasses.replace(MODEL_SIZES[size], tie_embeddings=False)):
        with torch.device("meta"):
            model = GPT(config)
        assert model.num_params() == count_params(config)


def test_large_sizes_match_their_namesakes() -> None:
    # With GPT-2's 50257-token vocabulary, "124m" and "350m" are exactly GPT-2 small and medium.
    gpt2_small = dataclasses.replace(model_config("124m"), vocab_size=50257)
    gpt2_medium = dataclasses.replace(model_config("350m"), vocab_size=50257)
    assert count_params(gpt2_small) == 124_439_808
    assert count_params(gpt2_medium) == 354_823_168
    assert 0.9e9 <= count_params(model_config("1b")) <= 1.1e9


def test_model_config_errors_and_block_size_override() -> None:
    with pytest.raises(ValueError, match="tiny, small, 10m, 124m, 350m, 1b"):
        model_config("huge")
    assert model_config("tiny", block_size=32).block_size == 32


@pytest.mark.parametrize(
    "fields", [{"n_embd": 100, "n_head": 3}, {"n_layer": 0}, {"block_size": -1}, {"dropout": 1.0}]
)
def test_config_validation(fields: dict[str, object]) -> None:
    base = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8}
    with pytest.raises(ValueError, match="GPTConfig"):
        GPTConfig(**{**base, **fields})


def test_causal_mask_holds() -> None:
    model = build_model(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32), seed=1).eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_initial_loss_is_near_uniform() -> None:
    model = build_model("tiny", seed=0)
    idx, targets = torch.randint(0, 256, (2, 4, 64), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 64, 256)
    assert loss is not None
    assert abs(loss.item() - math.log(256)) < 0.1


def test_init_is_a_pure_function_of_the_seed() -> None:
    state = torch.get_rng_state()
    a, b, c = (build_model("tiny", seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state), "build_model must not consume the global RNG"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_tied_embeddings_are_one_tensor() -> None:
    tied = build_model("tiny", seed=0)
    untied = build_model(dataclasses.replace(model_config("tiny"), tie_embeddings=False), seed=0)
    assert "lm_head.weight" not in dict(tied.named_parameters())
    assert "lm_head.weight" in dict(untied.named_parameters())


def test_adamw_steps_reduce_loss_on_a_fixed_batch() -> None:
    model = build_model("tiny", seed=0)
    idx = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_sequence_longer_than_block_size_is_refused() -> None:
    model = build_model(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8), seed=0)
    with pytest.raises(ValueError, match="block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_shapes_are_read_without_running_initialisers() -> None:
    # A meta tensor's random draw goes through PyTorch's reference implementations, whose first use imports
    # torch._dynamo: seconds at every node's start, paid inside its first round.
    code = (
        "import sys; from potluck.training.models import model_config, parameter_shapes;"
        "shapes = parameter_shapes(model_config('tiny', block_size=64));"
        "print(len(shapes), 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == [str(len(list(build_model("tiny", seed=0).parameters()))), "False"]
