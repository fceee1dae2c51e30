"""Error feedback: what a codec drops is carried in the caller's residual and sent later."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.protocol.codecs import available_codecs, make_codec
from tests.protocol.codecs.helpers import flat, spec, tensor_dicts

# The sparse codecs decay their residual by default; the exact identities below hold without decay.
_NO_DECAY = {"topk": {"ef_decay": 1.0}, "dct-topk": {"ef_decay": 1.0}}


@pytest.mark.parametrize("name", available_codecs())
@given(first=tensor_dicts(max_tensors=3, scale=1.0), rounds=st.integers(1, 6), seed=st.integers(0, 1000))
@settings(max_examples=25)
def test_sent_plus_residual_telescopes_to_the_sum_of_inputs(name: str, first: dict, rounds: int, seed: int) -> None:
    # Prepare
    codec, state = make_codec(name, _NO_DECAY.get(name)), {}
    gen = torch.Generator().manual_seed(seed)
    inputs = [first] + [{k: torch.randn(v.shape, generator=gen) for k, v in first.items()} for _ in range(rounds - 1)]
    # Execute
    sent = sum(flat(codec.decode(codec.encode(x, state), spec(x))) for x in inputs)
    # Assert: sum(decoded) + residual == sum(inputs), up to float rounding
    total = sum(flat(x) for x in inputs)
    residual = flat({k: state[k] for k in first})
    largest = float(total.abs().max()) if total.numel() else 0.0
    assert torch.allclose(sent + residual, total, atol=1e-5 * rounds * (1 + largest))


@pytest.mark.parametrize("name", ["topk", "dct-topk"])
def test_feedback_tracks_the_running_sum_far_better_than_none(name: str) -> None:
    # Prepare: a persistent direction plus as much noise each round, as pseudo-gradients have;
    # 200 rounds so that 1/64 density has had time to send every coordinate a few times.
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4096, generator=gen)
    inputs = [{"w": base + torch.randn(4096, generator=gen)} for _ in range(200)]
    codec, state = make_codec(name, _NO_DECAY.get(name)), {}
    # Execute
    with_ef = sum(flat(codec.decode(codec.encode(x, state), spec(x))) for x in inputs)
    without = sum(flat(codec.decode(codec.encode(x), spec(x))) for x in inputs)
    # Assert: measured ~0.14 of the sum's norm with feedback, ~0.89 without
    total = sum(flat(x) for x in inputs)
    assert (total - with_ef).norm() < 0.25 * (total - without).norm()


def test_state_is_updated_in_place_with_decay() -> None:
    # Prepare
    codec = make_codec("dct-topk", {"ef_decay": 0.5})
    x = {"a": torch.randn(300), "b": torch.randn(4, 5)}
    old = {"a": torch.randn(300), "b": torch.randn(4, 5)}
    state = {k: v.clone() for k, v in old.items()}
    kept = state["a"]
    # Execute
    decoded = codec.decode(codec.encode(x, state), spec(x))
    # Assert: state = x + 0.5 * old - decode(payload), written into the same tensors
    assert state["a"] is kept
    for k in x:
        assert torch.allclose(state[k], x[k] + 0.5 * old[k] - decoded[k], atol=1e-6)


def test_state_for_another_model_is_refused() -> None:
    codec = make_codec("topk")
    with pytest.raises(ValueError, match="different model"):
        codec.encode({"a": torch.randn(10)}, {"a": torch.zeros(11)})


def test_non_finite_input_is_refused_with_the_tensor_name() -> None:
    codec = make_codec("int8")
    with pytest.raises(ValueError, match="'b'"):
        codec.encode({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode({"a": torch.ones(3, dtype=torch.int64)})
