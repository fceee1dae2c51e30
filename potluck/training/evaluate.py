"""Held-out loss: the number every peer and aggregator compares.

Aggregators use it to reject updates that make the model worse, and the status page plots it,
so it is computed the same way everywhere: fixed batches (``data.val_batches``), eval mode,
no gradients, fp32 unless asked otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn

from potluck.training.device import autocast_context

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str,
    autocast: bool = False,
) -> float:
    """Mean cross-entropy (nats per token) of ``model`` over ``batches``.

    Batches from ``val_batches`` all have the same shape, so the mean of batch means is the
    per-token mean. The model's train/eval mode is restored afterwards. ``autocast`` trades
    exactness for speed on GPU; leave it off where losses from different nodes are compared.
    """
    if not batches:
        raise ValueError("evaluate() needs at least one batch")
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for x, y in batches:
            with autocast_context(device) if autocast else contextlib.nullcontext():
                _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            total += loss.double()
        return (total / len(batches)).item()
    finally:
        model.train(was_training)
