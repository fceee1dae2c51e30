"""Held-out evaluation: a finite mean loss, with the model's mode left as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potluck.training.data import val_batches
from potluck.training.evaluate import evaluate
from potluck.training.models import GPTConfig, build_model


def _setup() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    model = build_model(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1), seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, 2_000, dtype=np.uint8)
    return model, val_batches(tokens, batch_size=4, block_size=16, num_batches=3)


def test_evaluate_returns_a_finite_loss_and_keeps_train_mode() -> None:
    model, batches = _setup()
    model.train()
    loss = evaluate(model, batches, device="cpu")
    assert isinstance(loss, float) and math.isfinite(loss)
    assert abs(loss - math.log(256)) < 0.2
    assert model.training


def test_evaluate_switches_dropout_off_and_restores_eval_mode() -> None:
    model, batches = _setup()
    model.train()
    # Dropout (p=0.1) would make repeats differ if evaluate left the model in train mode.
    assert evaluate(model, batches, device="cpu") == evaluate(model, batches, device="cpu")
    model.eval()
    evaluate(model, batches, device="cpu")
    assert not model.training


def test_evaluate_needs_batches() -> None:
    model, _ = _setup()
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(model, [], device="cpu")
