"""DiLoCo helpers: inner schedule and step, pseudo-gradients, the outer optimizer, checksums."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.training.diloco import (
    OuterOptimizer,
    inner_lr,
    inner_step,
    load_params,
    make_inner_optimizer,
    nesterov_step,
    pseudo_gradient,
    snapshot,
    state_sha256,
)
from potluck.training.models import GPTConfig, build_model

SMALL = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def _random_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def test_inner_lr_warmup_peak_and_decay_endpoints() -> None:
    kw = dict(total_steps=1000, peak_lr=1e-3, warmup_steps=100)
    assert 0 < inner_lr(0, **kw) < inner_lr(50, **kw) < inner_lr(99, **kw) < 1e-3
    assert inner_lr(100, **kw) == pytest.approx(1e-3)
    assert inner_lr(550, **kw) == pytest.approx(0.55e-3)  # cosine midpoint: halfway between peak and floor
    assert inner_lr(1000, **kw) == pytest.approx(1e-4)
    assert inner_lr(5000, **kw) == pytest.approx(1e-4)
    lrs = [inner_lr(s, **kw) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_inner_optimizer_decays_only_matrices() -> None:
    model = build_model(SMALL, seed=0)
    decayed, plain = make_inner_optimizer(model, lr=1e-3).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert decayed["betas"] == (0.9, 0.95)


def test_inner_steps_reduce_loss_and_set_lr() -> None:
    model = build_model(SMALL, seed=0)
    optimizer = make_inner_optimizer(model, lr=0.0)
    losses = [inner_step(model, optimizer, _batch(), lr=3e-3) for _ in range(15)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert all(group["lr"] == 3e-3 for group in optimizer.param_groups)


def test_pseudo_gradient_and_load_params_round_trip() -> None:
    model = build_model(SMALL, seed=0)
    start = snapshot(model)
    assert set(start) == {name for name, _ in model.named_parameters()}
    optimizer = make_inner_optimizer(model, lr=1e-2)
    for _ in range(3):
        inner_step(model, optimizer, _batch(), lr=1e-2)
    delta = pseudo_gradient(start, model)
    end = snapshot(model)
    assert all(torch.allclose(start[k] - delta[k], end[k]) for k in start)
    load_params(model, start)
    assert all(torch.equal(p, start[k]) for k, p in model.named_parameters())


def test_load_params_refuses_mismatched_dicts() -> None:
    model = build_model(SMALL, seed=0)
    params = snapshot(model)
    with pytest.raises(KeyError, match="missing"):
        load_params(model, {k: v for k, v in params.items() if k != "transformer.wte.weight"})
    params["transformer.wte.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        load_params(model, params)


def test_average_with_one_peer_reproduces_that_peer() -> None:
    model = build_model(SMALL, seed=0)
    master = snapshot(model)
    start = {k: v.clone() for k, v in master.items()}
    optimizer = make_inner_optimizer(model, lr=1e-2)
    for i in range(3):
        inner_step(model, optimizer, _batch(i), lr=1e-2)
    OuterOptimizer(kind="average").step(master, pseudo_gradient(master, model))
    peer = snapshot(model)
    # In fp32, start - fl(start - end) differs from end only by the two roundings:
    # under 2 ulps of the larger of |start| and |end|.
    eps = torch.finfo(torch.float32).eps
    for k in master:
        bound = 2 * eps * torch.maximum(start[k].abs(), peer[k].abs())
        assert torch.all((master[k] - peer[k]).abs() <= bound), k


def test_average_with_one_peer_is_exact_when_the_delta_is() -> None:
    # Dyadic values with few significant bits make every subtraction exact.
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randint(-512, 512, (8, 8), generator=g).float() / 256}
    end = {"w": torch.randint(-512, 512, (8, 8), generator=g).float() / 256}
    master = {k: v.clone() for k, v in start.items()}
    OuterOptimizer(kind="average").step(master, {k: start[k] - end[k] for k in start})
    assert torch.equal(master["w"], end["w"])


def test_average_applies_the_delta_exactly() -> None:
    master, delta = _random_params(0), _random_params(1)
    expected = {k: master[k] - delta[k] for k in master}
    OuterOptimizer(kind="average", lr=0.3, momentum=0.5).step(master, delta)
    assert all(torch.equal(master[k], expected[k]) for k in master)


def test_nesterov_matches_torch_sgd() -> None:
    master = _random_params(0)
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in master.items()}
    sgd = torch.optim.SGD(reference.values(), lr=0.7, momentum=0.9, nesterov=True)
    outer = OuterOptimizer(kind="nesterov")
    for step in range(6):
        grads = _random_params(100 + step)
        for k, p in reference.items():
            p.grad = grads[k].clone()
        sgd.step()
        outer.step(master, grads)
        assert all(torch.equal(master[k], reference[k].detach()) for k in master)


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(0.01, 2.0), momentum=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_nesterov_step_is_pure(lr: float, momentum: float, seed: int) -> None:
    param, grad = _random_params(seed)["w"], _random_params(seed + 1)["w"]
    buf = torch.zeros_like(param)
    copies = param.clone(), grad.clone()
    new_param, new_buf = nesterov_step(param, grad, buf, lr=lr, momentum=momentum)
    assert torch.equal(param, copies[0]) and torch.equal(grad, copies[1]) and not buf.any()
    assert torch.allclose(new_buf, grad)
    assert torch.allclose(new_param, param - lr * (1 + momentum) * grad, atol=1e-6)


def test_outer_state_dict_round_trip() -> None:
    master_a = _random_params(0)
    a = OuterOptimizer(kind="nesterov")
    for step in range(3):
        a.step(master_a, _random_params(10 + step))
    b = OuterOptimizer(kind="nesterov")
    b.load_state_dict(a.state_dict())
    master_b = {k: v.clone() for k, v in master_a.items()}
    delta = _random_params(99)
    a.step(master_a, delta)
    b.step(master_b, delta)
    assert all(torch.equal(master_a[k], master_b[k]) for k in master_a)
    assert set(a.state_dict()) == set(master_a)


@pytest.mark.parametrize("kind", ["nesterov", "average"])
def test_a_preview_is_the_next_step_without_taking_it(kind: str) -> None:
    # Prepare: an optimizer with momentum already built up
    master = _random_params(0)
    outer = OuterOptimizer(kind=kind, lr=0.7, momentum=0.5)  # type: ignore[arg-type]
    for step in range(2):
        outer.step(master, _random_params(20 + step))
    before, state = {k: v.clone() for k, v in master.items()}, outer.state_dict()
    delta = _random_params(7)
    # Execute
    guess = outer.preview(master, delta)
    # Assert: the same values a step gives, and nothing moved
    assert all(torch.equal(master[k], before[k]) for k in master)
    assert all(torch.equal(outer.state_dict()[k], state[k]) for k in state)
    outer.step(master, delta)
    assert all(torch.equal(guess[k], master[k]) for k in master)


def test_outer_optimizer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown outer optimizer"):
        OuterOptimizer(kind="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        OuterOptimizer(kind="nesterov", momentum=1.0)


def test_state_sha256_is_deterministic_and_sensitive() -> None:
    params = _random_params(0)
    digest = state_sha256(params)
    assert len(digest) == 32
    assert state_sha256({k: v.clone() for k, v in reversed(params.items())}) == digest
    changed = {k: v.clone() for k, v in params.items()}
    changed["w"][1, 2] += 1e-6
    assert state_sha256(changed) != digest
    assert state_sha256({"w": params["w"].reshape(4, 3), "b": params["b"]}) != digest
    assert state_sha256({"w": params["w"].double(), "b": params["b"]}) != digest
    assert state_sha256({"x": params["w"], "b": params["b"]}) != digest
