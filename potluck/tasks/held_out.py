"""A run's held-out loss (its task's loss on its held-out batches): the one scorer of full parameter sets.

The aggregator scores every round (and, for its held-out check, each update applied alone on the first
few batches). A serverless peer has no aggregator, and in a sharded run each aggregator holds one shard
only, so there a peer (the one `potluck swarm` reports on) scores its own copy of the master state after
each round: the same batches of the run's corpus, the same ``evaluate``, so its numbers compare with an
aggregator's.
"""

from collections.abc import Callable

import torch

from potluck.protocol.config import RunConfig
from potluck.tasks.base import Batch
from potluck.tasks.registry import run_task
from potluck.training.diloco import load_params
from potluck.training.evaluate import evaluate


class HeldOutLoss:
    """Scores full parameter sets on the run's first `batches` held-out batches; loads them on first use."""

    def __init__(self, cfg: RunConfig, *, batches: int) -> None:
        self.cfg = cfg
        self.batches = batches
        self._held_out: list[Batch] | None = None
        self._model: torch.nn.Module | None = None
        self._loss_of: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None

    def load(self) -> None:
        """Load the held-out batches and the scoring model now (a corpus problem then shows at start)."""
        if self._held_out is not None and self._model is not None:
            return
        task = run_task(self.cfg)
        self._held_out = task.held_out_batches(batch_size=self.cfg.inner.batch_size, count=self.batches)
        self._model = task.build_model(seed=self.cfg.seed)
        self._loss_of = task.loss

    def __call__(self, params: dict[str, torch.Tensor], *, first: int | None = None) -> float:
        """Held-out loss (nats per token) of the model with `params`, on the `first` batches (all by default)."""
        self.load()
        assert self._held_out is not None and self._model is not None
        load_params(self._model, params)
        return evaluate(self._model, self._held_out[:first], device="cpu", loss_of=self._loss_of)
