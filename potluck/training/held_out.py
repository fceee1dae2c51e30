"""A run's held-out loss for whoever holds the whole model but no aggregator does the scoring.

The aggregator scores every round itself. A serverless peer has no aggregator, and in a sharded run
each aggregator holds one shard only, so there a peer (the one `potluck swarm` reports on) scores its
own copy of the master state after each round: the same batches of the run's corpus, the same
``evaluate``, so its numbers compare with an aggregator's.
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

    def __call__(self, params: dict[str, torch.Tensor]) -> float:
        """Held-out loss (nats per token) of the model with `params`."""
        cfg = self.cfg
        model_cfg = model_config(cfg.model.size, block_size=cfg.model.block_size)
        if self._held_out is None or self._model is None:
            corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, max_bytes=cfg.data.max_bytes)
            self._held_out = val_batches(
                corpus.val, batch_size=cfg.inner.batch_size, block_size=model_cfg.block_size, num_batches=self.batches
            )
            self._model = build_model(model_cfg, seed=cfg.seed)
        load_params(self._model, params)
        return evaluate(self._model, self._held_out, device="cpu")
