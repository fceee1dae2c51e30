"""DiLoCo building blocks: the inner AdamW loop, pseudo-gradients and the outer optimizer.

A round: ``start = snapshot(model)``, many ``inner_step`` calls, then
``delta = pseudo_gradient(start, model)`` is compressed and sent. The aggregate of the
peers' deltas drives ``OuterOptimizer.step`` on the master parameters, which every node
then loads with ``load_params``. Hyperparameters follow He et al. (arXiv 2409.13198): inner
AdamW with betas (0.9, 0.95) and cosine decay to 10%, outer Nesterov with lr 0.7 and
momentum 0.9.

Only named *parameters* cross the wire, never buffers. Parameter dicts are keyed by
``model.named_parameters()`` names and hold fp32 tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn as nn

from potluck.training.device import autocast_context, batch_to

__all__ = [
    "OuterOptimizer",
    "inner_lr",
    "inner_step",
    "load_params",
    "make_inner_optimizer",
    "nesterov_step",
    "pseudo_gradient",
    "snapshot",
    "state_sha256",
]


def inner_lr(step: int, *, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Inner learning rate at ``step``: linear warmup to ``peak_lr``, then cosine decay to ``min_lr_ratio * peak_lr``.

    ``step`` counts inner steps over the whole run (not per round), from 0. Warmup reaches
    the peak at ``step == warmup_steps``; the floor is reached at ``total_steps`` and held after.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps >= 1"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    min_lr = min_lr_ratio * peak_lr
    if step < warmup_steps:
        # (step + 1), as in nanoGPT, so step 0 already learns instead of running at lr 0
        return peak_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def make_inner_optimizer(
    model: nn.Module, *, lr: float, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1
) -> torch.optim.AdamW:
    """AdamW that decays only matrices (linear weights and embeddings), as nanoGPT does.

    Biases and LayerNorm gains (the 1-D parameters) are not decayed: pulling a gain towards
    zero only fights the normalisation. Uses the fused CUDA kernel when the model is on GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def split_batch(batch: Any, size: int | None) -> list[tuple[int, Any]]:
    """`batch` cut along its first dimension into pieces of at most `size` samples, with each piece's size.

    Tensors, and tuples, lists and dicts of them, are cut alike; None or a size at least the batch's: one piece.
    """

    def first(value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        return first(next(iter(value.values())) if isinstance(value, Mapping) else value[0])

    n = int(first(batch).shape[0])
    if size is None or size >= n:
        return [(n, batch)]

    def cut(value: Any, lo: int, hi: int) -> Any:
        if isinstance(value, torch.Tensor):
            return value[lo:hi]
        if isinstance(value, Mapping):
            return {key: cut(item, lo, hi) for key, item in value.items()}
        return type(value)(cut(item, lo, hi) for item in value)

    return [(min(lo + size, n) - lo, cut(batch, lo, min(lo + size, n))) for lo in range(0, n, size)]


def inner_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    *,
    lr: float,
    grad_clip: float | None = 1.0,
    autocast: bool = False,
    loss_of: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    micro_batch: int | None = None,
) -> float:
    """One optimizer step on ``batch`` at learning rate ``lr``; returns the batch loss.

    ``loss_of(model, batch)`` is the task's loss (None: the built-in GPT's, ``model(x, y)``). With
    ``micro_batch``, the batch goes through the model that many samples at a time, the gradients adding
    up (gradient accumulation): the same step in less memory. Each piece is moved to the model's device
    when its turn comes. ``autocast`` turns on bf16 autocast where the device supports it (see
    ``device.autocast_context``). Gradients are clipped to global norm ``grad_clip`` unless it is None.
    """
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    pieces = split_batch(batch, micro_batch)
    total = sum(size for size, _ in pieces)
    loss = torch.zeros((), device=device)
    for size, piece in pieces:
        piece = batch_to(piece, device)
        with autocast_context(device) if autocast else contextlib.nullcontext():
            part = (model(*piece)[1] if loss_of is None else loss_of(model, piece)) * (size / total)
        part.backward()
        loss += part.detach().float()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def snapshot(model: nn.Module, *, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Detached fp32 copies of the model's named parameters, on the model's device by default.

    Keeping the copy on the GPU makes ``pseudo_gradient`` a device-side subtraction; pass
    ``device="cpu"`` to trade that speed for GPU memory (one fp32 copy of the model).
    """
    return {
        name: p.detach().to(device=p.device if device is None else device, dtype=torch.float32, copy=True)
        for name, p in model.named_parameters()
    }


def _check_names(expected: Mapping[str, object], got: Mapping[str, object], what: str) -> None:
    if expected.keys() != got.keys():
        missing = sorted(expected.keys() - got.keys())[:5]
        extra = sorted(got.keys() - expected.keys())[:5]
        raise KeyError(f"{what} does not match the model's parameters: missing {missing}, unexpected {extra}")


@torch.no_grad()
def pseudo_gradient(start: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``start - current`` per named parameter (fp32, on ``start``'s devices): the DiLoCo outer gradient.

    The sign makes it a gradient: ``master -= lr * delta`` moves the master towards where the
    peer went.
    """
    current = dict(model.named_parameters())
    _check_names(current, start, "start snapshot")
    return {name: s - current[name].detach().to(s.device, torch.float32) for name, s in start.items()}


@torch.no_grad()
def load_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Copy ``params`` into the model's named parameters in place (converting device and dtype).

    Names and shapes must match exactly; optimizer state keyed on the parameters stays valid.
    """
    current = dict(model.named_parameters())
    _check_names(current, params, "parameter dict")
    for name, p in current.items():
        if p.shape != params[name].shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}, got {tuple(params[name].shape)}")
    for name, p in current.items():
        p.copy_(params[name])


def nesterov_step(
    param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, *, lr: float, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Nesterov-momentum SGD step as pure arithmetic: returns ``(new_param, new_buf)``.

    The same update as ``torch.optim.SGD(nesterov=True, dampening=0)``:
    ``buf = momentum * buf + grad``; ``param -= lr * (grad + momentum * buf)``.
    """
    new_buf = buf * momentum + grad
    # add(..., alpha=) as torch.optim.SGD does it, so the two agree bit for bit
    return param.add(grad.add(new_buf, alpha=momentum), alpha=-lr), new_buf


class OuterOptimizer:
    """The outer step applied to the master parameters after each round.

    ``"nesterov"``: SGD with Nesterov momentum (DiLoCo; lr 0.7, momentum 0.9).
    ``"average"``: ``master -= delta``, i.e. adopt the averaged peer parameters (lr 1, no
    momentum; ``lr`` and ``momentum`` are ignored). With one peer it reproduces that peer.
    """

    def __init__(self, *, kind: Literal["nesterov", "average"], lr: float = 0.7, momentum: float = 0.9) -> None:
        if kind not in ("nesterov", "average"):
            raise ValueError(f"unknown outer optimizer {kind!r}; use 'nesterov' or 'average'")
        if kind == "nesterov" and (lr <= 0 or not 0 <= momentum < 1):
            raise ValueError(f"outer Nesterov needs lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        self.kind = kind
        self.lr = lr if kind == "nesterov" else 1.0
        self.momentum = momentum if kind == "nesterov" else 0.0
        self._buf: dict[str, torch.Tensor] = {}  # momentum buffers, created on the first step

    @torch.no_grad()
    def step(self, master: dict[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
        """Update ``master`` in place with the aggregated pseudo-gradient ``delta``."""
        _check_names(master, delta, "outer delta")
        for name, param in master.items():
            grad = delta[name].to(param.device, param.dtype)
            if self.kind == "average":
                param.sub_(grad)
                continue
            buf = self._buf.get(name)
            buf = torch.zeros_like(param) if buf is None else buf.to(param.device)
            # Temporaries are one tensor at a time, so peak memory grows by one layer, not a model.
            new_param, self._buf[name] = nesterov_step(param, grad, buf, lr=self.lr, momentum=self.momentum)
            param.copy_(new_param)

    @torch.no_grad()
    def preview(
        self, master: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The parameters `step(master, delta)` would give, as new tensors; neither `master` nor the momentum changes.

        An overlapped peer trains from this guess of the next master state while its update is in flight.
        """
        _check_names(master, delta, "outer delta")
        guess = {}
        for name, param in master.items():
            grad = delta[name].to(param.device, param.dtype)
            if self.kind == "average":
                guess[name] = param - grad
                continue
            buf = self._buf.get(name)
            buf = torch.zeros_like(param) if buf is None else buf.to(param.device)
            guess[name], _ = nesterov_step(param, grad, buf, lr=self.lr, momentum=self.momentum)
        return guess

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The momentum buffers keyed by parameter name (empty before the first step or for "average")."""
        return {name: buf.detach().clone() for name, buf in self._buf.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore momentum buffers saved by ``state_dict``."""
        self._buf = {name: buf.detach().to(torch.float32, copy=True) for name, buf in state.items()}


_SHA_DOMAIN = b"potluck/state-sha256/v1\0"


def state_sha256(params: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over names, dtypes, shapes and raw bytes, in sorted-name order.

    Peers compare it with the aggregator's after applying an aggregate, to detect drift.
    Every field is length-prefixed, so no two different dicts share an encoding. Raw bytes
    are in native order, little-endian on every platform PyTorch ships wheels for.
    """
    h = hashlib.sha256(_SHA_DOMAIN + struct.pack("<Q", len(params)))
    for name in sorted(params):
        t = params[name].detach()
        for field in (name.encode(), str(t.dtype).removeprefix("torch.").encode()):
            h.update(struct.pack("<Q", len(field)) + field)
        h.update(struct.pack("<Q", t.dim()) + struct.pack(f"<{t.dim()}Q", *t.shape))
        raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(struct.pack("<Q", raw.nbytes))
        h.update(raw.data)
    return h.digest()
