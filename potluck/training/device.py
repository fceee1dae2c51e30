"""Where training runs: device choice, mixed precision and CPU thread count.

CUDA when present, else CPU (DESIGN.md: everything must work on CPU). On CUDA the forward
pass runs under bf16 autocast; bf16 needs no loss scaling, unlike fp16.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["autocast_context", "batch_to", "pick_device", "set_cpu_threads"]

logger = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """The device to train on: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    requested = requested.strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {requested!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {requested!r} requested but CUDA is not available to this PyTorch "
            f"(torch {torch.__version__}); install a CUDA build of torch or use --device cpu"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RuntimeError(f"device {requested!r} requested but only {count} CUDA device(s) exist (cuda:0..)")
    return device


def autocast_context(device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on a CUDA device that supports bf16; a do-nothing context otherwise.

    GPUs without native bf16 (compute capability below 8.0, before Ampere) run in fp32 rather
    than fp16, which would need a gradient scaler.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_cpu_threads(n: int | None) -> None:
    """Set the intra-op threads PyTorch uses on CPU; ``None`` keeps PyTorch's default.

    Several peers on one machine (a local swarm) should each take a share of the cores
    instead of all of them, or they slow each other down.
    """
    if n is None:
        return
    if n < 1:
        raise ValueError(f"CPU thread count must be at least 1, got {n}")
    torch.set_num_threads(n)
    logger.debug("torch CPU threads set to %d", n)


def batch_to(batch: Any, device: torch.device | str) -> Any:
    """`batch` with every tensor in it moved to `device` (tuples, lists and dicts are walked)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: batch_to(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(batch_to(value, device) for value in batch)
    return batch
