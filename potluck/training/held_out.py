"""A run's held-out loss: the one scorer of full parameter sets, for the aggregator and for peers.

The aggregator scores every round (and, for its held-out check, each update applied alone on the first
few batches). A serverless peer has no aggregator, and in a sharded run each aggregator holds one shard
only, so there a peer (the one `potluck swarm` reports on) scores its own copy of the master state after
each round: the same batches of the run's corpus, the same ``evaluate``, so its numbers compare with an
aggregator's.
"""

import torch

from potluck.protocol.config import RunConfig
from potluck.training.data import load_corpus, val_batches
from potluck.training.diloco import load_params
from potluck.training.evaluate import evaluate
from potluck.training.models import build_model, model_config


class HeldOutLoss:
    """Scores full parameter sets on the run's first `batches` held-out batches; loads them on first use."""

    def __init__(self, cfg: RunConfig, *, batches: int) -> None:
        self.cfg = cfg
        self.batches = batches
        self._held_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._model: torch.nn.Module | None = None

    def load(self) -> None:
        """Load the held-out batches and the scoring model now (a corpus problem then shows at start)."""
        if self._held_out is not None and self._model is not None:
            return
        cfg = self.cfg
        model_cfg = model_config(cfg.model.size, block_size=cfg.model.block_size)
        corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, max_bytes=cfg.data.max_bytes)
        self._held_out = val_batches(
            corpus.val, batch_size=cfg.inner.batch_size, block_size=model_cfg.block_size, num_batches=self.batches
        )
        self._model = build_model(model_cfg, seed=cfg.seed)

    def __call__(self, params: dict[str, torch.Tensor], *, first: int | None = None) -> float:
        """Held-out loss (nats per token) of the model with `params`, on the `first` batches (all by default)."""
        self.load()
        assert self._held_out is not None and self._model is not None
        load_params(self._model, params)
        return evaluate(self._model, self._held_out[:first], device="cpu")
