"""A peer's inner-optimizer state on disk, so that a restarted peer trains on as it did before it stopped.

A fresh AdamW steps differently from one that has seen the run: a peer restarted mid-run with a new
optimizer sent updates 1.5-2x the norm of the others' for four rounds (bench/restart_norms.py), and the
round's norm check dropped them, round after round. So after each round the peer writes its optimizer's
state beside its identity key (atomically, in the background, one write at a time) and, when it starts
again in the same run, takes it back. The file is this machine's own, but it is read as carefully as any
input: it is used only when it names this run's config, is at most MAX_AGE_ROUNDS rounds old and matches
the optimizer tensor for tensor; anything else is ignored with one log line. A failed write (a full disk)
costs only the next restart's head start.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

STATE_SUFFIX = ".inner-state.safetensors"
FORMAT = "potluck-inner-state/1"
MAX_AGE_ROUNDS = 20  # older moments describe gradients the run has left behind; a fresh start is as good


def state_file(identity_path: Path) -> Path:
    """Where a peer keeps its inner-optimizer state: beside its identity key, so that they move together."""
    return identity_path.with_name(identity_path.stem + STATE_SUFFIX)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat named CPU tensors (`<index>.<name>`), copied."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                flat[f"{index}.{name}"] = value.detach().to("cpu", copy=True).reshape(-1 if value.dim() else 1)
    return flat


def save_state(path: Path, tensors: Mapping[str, torch.Tensor], *, config_hash: str, round_index: int) -> None:
    """Write `tensors` (state_tensors) for round `round_index` of the run `config_hash`, atomically; OSError if not."""
    meta = {"format": FORMAT, "config": config_hash, "round": str(round_index)}
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(dict(tensors), str(partial), metadata=meta)
        os.replace(partial, path)
    except (OSError, SafetensorError) as e:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise e if isinstance(e, OSError) else OSError(str(e)) from e


def load_state(path: Path, optimizer: torch.optim.Optimizer, *, config_hash: str, round_index: int) -> bool:
    """Put the state saved in `path` into `optimizer` when it is this run's, recent and fits; whether it did."""
    if not path.is_file():
        return False
    params = _params(optimizer)
    limit = 4 * sum(p.numel() * 4 for p in params) + (1 << 20)  # two fp32 moments and a step per tensor, with room
    why = None
    try:
        if path.stat().st_size > limit:
            why = f"it is larger than this model's state can be ({path.stat().st_size} bytes)"
        else:
            why, state = _read(path, params, config_hash=config_hash, round_index=round_index)
    except (OSError, SafetensorError, ValueError) as e:
        why = f"it cannot be read ({e})"
    if why is not None:
        logger.info("inner optimizer state in %s not used: %s; starting it afresh", path, why)
        return False
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    logger.info("inner optimizer state taken back from %s", path)
    return True


def _read(
    path: Path, params: list[torch.Tensor], *, config_hash: str, round_index: int
) -> tuple[str | None, dict[int, dict[str, Any]]]:
    """(why it cannot be used, or None; the optimizer state it holds)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or meta.get("config") != config_hash:
        return "it is another run's (or another version's)", {}
    saved_round = int(meta.get("round", "-1"))
    if not 0 <= round_index - saved_round <= MAX_AGE_ROUNDS:
        return f"it is from round {saved_round}, this run is at round {round_index}", {}
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(path)).items():
        index_text, _, name = key.partition(".")
        index = int(index_text)
        if not 0 <= index < len(params) or not tensor.dtype.is_floating_point or not torch.isfinite(tensor).all():
            return f"its tensor {key!r} fits no parameter of this model", {}
        if name == "step":
            state.setdefault(index, {})[name] = tensor.reshape(())
        elif tensor.numel() == params[index].numel():
            state.setdefault(index, {})[name] = tensor.reshape(params[index].shape).to(params[index].device)
        else:
            return f"its tensor {key!r} has another size than the parameter", {}
    if sorted(state) != list(range(len(params))) or any(set(s) != set(state[0]) for s in state.values()):
        return "it does not hold the same state for every parameter", {}
    return None, state


class StateWriter:
    """Writes the trainer's optimizer state after each round, in the background, at most one write at a time."""

    def __init__(self, path: Path, *, config_hash: str) -> None:
        self.path = path
        self.config_hash = config_hash
        self.writing: asyncio.Task[None] | None = None
        self.failed = False  # a write failed already (said once: a full disk would say it every round)

    async def after_round(self, optimizer: torch.optim.Optimizer, round_index: int) -> None:
        """Save the state round `round_index` left (call while no inner step runs); skipped while one is written."""
        if self.writing is not None and not self.writing.done():
            return
        tensors = await asyncio.to_thread(state_tensors, optimizer)
        self.writing = asyncio.create_task(asyncio.to_thread(self._write, tensors, round_index))

    def _write(self, tensors: Mapping[str, torch.Tensor], round_index: int) -> None:
        try:
            save_state(self.path, tensors, config_hash=self.config_hash, round_index=round_index)
        except OSError as e:
            if not self.failed:
                logger.warning(
                    "inner optimizer state not saved to %s (%s); a restart would start it afresh", self.path, e
                )
            self.failed = True

    async def close(self) -> None:
        """Let the write in progress finish (the peer is stopping: its last state is what a restart takes back)."""
        if self.writing is not None:
            await self.writing
