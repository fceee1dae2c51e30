"""A task of your own that is not a language model: handwritten digits, classified by a small network.

The data is scikit-learn's bundled copy of the UCI digits (1,797 8x8 images; no download). Every node
that takes part imports this module from its own Python installation; a run only names it:

    PYTHONPATH=examples/digits potluck swarm --task digits_task:DigitsTask --peers 2 --rounds 12

`DigitsTask(hidden=...)` takes its parameters from the run's `[task] params` table.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from potluck import Task

HELD_OUT_FRACTION = 0.2


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    features = torch.tensor(data.data, dtype=torch.float32) / 16.0  # pixel intensities 0..16
    return features, torch.tensor(data.target, dtype=torch.long)


class DigitsTask(Task):
    """A two-layer perceptron on 8x8 digit images; work is counted in images."""

    def __init__(self, hidden: int = 64) -> None:
        features, labels = _digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # the same split everywhere
        cut = int(len(labels) * (1 - HELD_OUT_FRACTION))
        self.hidden = hidden
        self.train_x, self.train_y = features[order[:cut]], labels[order[:cut]]
        self.val_x, self.val_y = features[order[cut:]], labels[order[cut:]]

    def build_model(self, *, seed: int) -> nn.Module:
        """The network with PyTorch's default initialisation, drawn from `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def train_batches(self, *, seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random training images, a different sequence for every peer's seed."""
        rng = np.random.default_rng(seed)
        while True:
            rows = torch.from_numpy(rng.integers(0, len(self.train_y), size=batch_size))
            yield self.train_x[rows], self.train_y[rows]

    def held_out_batches(self, *, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out images in order, `count` batches of them (wrapping around when there are fewer)."""
        rows = torch.arange(batch_size * count) % len(self.val_y)
        return [(self.val_x[r], self.val_y[r]) for r in rows.reshape(count, batch_size)]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the predicted digit."""
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """Share of the held-out images classified right (chance: 0.1)."""
        return float((model(self.val_x).argmax(dim=1) == self.val_y).float().mean())
