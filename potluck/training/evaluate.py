"""Held-out loss: the number every peer and aggregator compares.

Aggregators use it to reject updates that make the model worse, and the status page plots it,
so it is computed the same way everywhere: fixed batches (``data.val_batches``), eval mode,
no gradients, fp32 unless asked otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from potluck.training.device import autocast_context, batch_to

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    device: torch.device | str,
    autocast: bool = False,
    loss_of: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> float:
    """Mean loss of ``model`` over ``batches`` (for a language model, cross-entropy in nats per token).

    ``loss_of(model, batch)`` is the task's loss (None: the built-in GPT's, ``model(x, y)``). Held-out
    batches all have the same shape, so the mean of batch means is the per-token (per-sample) mean. The
    model's train/eval mode is restored afterwards. ``autocast`` trades exactness for speed on GPU;
    leave it off where losses from different nodes are compared.
    """
    if not batches:
        raise ValueError("evaluate() needs at least one batch")
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            on_device = batch_to(batch, device)
            with autocast_context(device) if autocast else contextlib.nullcontext():
                loss = model(*on_device)[1] if loss_of is None else loss_of(model, on_device)
            total += loss.double()
        return (total / len(batches)).item()
    finally:
        model.train(was_training)
