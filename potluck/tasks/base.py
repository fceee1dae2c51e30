"""The task: the one seam between potluck and what a run trains.

A run trains a *task*: how to build the model from the run's seed, where its training and held-out
batches come from, the loss of a batch, and how much work a batch is worth (tokens for a language model,
samples otherwise; weights and credit count it). The peer, the aggregator's master state and held-out
check, the standby, `simulate`, `plan` and the red team all get their model and batches from the run's
task and build nothing themselves.

A volunteer's own task subclasses `Task`; the run names it as ``package.module:attribute`` and every node
imports it from its own Python installation (potluck.tasks.registry).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from potluck.errors import PotluckError
from potluck.training.models import on_meta

__all__ = ["Batch", "Task", "TaskError", "architecture_fingerprint", "samples_in"]

# A batch is whatever the task's loss reads: a tensor, or a tuple, list or dict of them (nested).
Batch = Any


class TaskError(PotluckError):
    """The run's task cannot be built or used here: missing, failing to import, or not what the run says."""


class Task(ABC):
    """What a run trains: the model, its batches, its loss and what a batch is worth.

    Every method must give the same answer on every node for the same arguments: the run compares
    models by their architecture fingerprint and scores updates on the same held-out batches.
    """

    @abstractmethod
    def build_model(self, *, seed: int) -> nn.Module:
        """A freshly initialised model on the CPU whose weights are a pure function of `seed`."""

    @abstractmethod
    def train_batches(self, *, seed: int, batch_size: int) -> Iterator[Batch]:
        """One peer's endless stream of training batches; `seed` differs per peer, so peers see different data."""

    @abstractmethod
    def held_out_batches(self, *, batch_size: int, count: int) -> list[Batch]:
        """The first `count` held-out batches: the same on every node, never trained on."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The mean loss of `model` on `batch` (a scalar tensor with a graph): what training lowers."""

    def example_batch(self, *, batch_size: int, seed: int) -> Batch:
        """A batch of the task's shape for timing a step (`plan`): the first training batch by default."""
        return next(self.train_batches(seed=seed, batch_size=batch_size))

    def work(self, batch: Batch) -> int:
        """How much work `batch` is worth: its samples by default (a language model counts tokens)."""
        return samples_in(batch)

    def most_work(self, *, batch_size: int) -> int:
        """The most work one batch of `batch_size` can be worth: the cap on a round's weight and credit."""
        return batch_size

    def enable_checkpointing(self, model: nn.Module) -> None:
        """Recompute activations in the backward pass (less memory, more compute); TaskError when unsupported."""
        raise TaskError(f"task {type(self).__name__} does not support activation checkpointing")

    def skeleton(self) -> nn.Module:
        """The model's structure on the meta device (no memory, no initialisation): for names and shapes."""
        return on_meta(lambda: self.build_model(seed=0))

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes in the model's own order, the order every payload is in (read once)."""
        shapes: dict[str, tuple[int, ...]] | None = self.__dict__.get("_potluck_shapes")
        if shapes is None:
            shapes = {name: tuple(p.shape) for name, p in self.skeleton().named_parameters()}
            self.__dict__["_potluck_shapes"] = shapes
        return dict(shapes)

    def fingerprint(self) -> str:
        """The architecture fingerprint the run's config carries (see architecture_fingerprint)."""
        return architecture_fingerprint(self.skeleton())

    def export(self, model: nn.Module, out: Path, *, run: Mapping[str, Any]) -> list[str]:
        """Write the trained `model` to the new directory `out` in a form loaded without potluck; the files written.

        By default the weights as safetensors (`model.safetensors`, the model's own parameter names) and
        `potluck.json`, what they are: the task, the run (`run`: its name, round, config hash) and the shapes.
        """
        import safetensors.torch

        state = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}  # tied: once
        safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        about = {**run, "parameters": {name: list(t.shape) for name, t in state.items()}}
        (out / "potluck.json").write_text(json.dumps(about, indent=2) + "\n")
        return ["model.safetensors", "potluck.json"]


def architecture_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) over the model's parameter names, shapes and dtypes, in the model's order.

    Two nodes whose models differ in any of these cannot exchange updates; the run's config carries
    this value, so a volunteer's mismatched model is refused before it trains.
    """
    described = [[name, list(p.shape), str(p.dtype).removeprefix("torch.")] for name, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(described, separators=(",", ":")).encode()).hexdigest()


def samples_in(batch: Batch) -> int:
    """The leading dimension of the first tensor in `batch`: its number of samples."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        return samples_in(value)
    raise TaskError("a batch holds no tensor to count samples in")
