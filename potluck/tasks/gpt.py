"""The built-in task: potluck's own byte-level GPT family (`model.size`), the default of every run."""

from __future__ import annotations

import torch
import torch.nn as nn

from potluck.protocol.config import RunConfig
from potluck.tasks.base import Batch, TaskError
from potluck.tasks.language import LanguageModelTask
from potluck.training.models import GPT, GPTConfig, build_model, model_config, on_meta


class GPTTask(LanguageModelTask):
    """A decoder-only transformer of one of the built-in sizes, on bytes."""

    name = "gpt"

    def __init__(self, cfg: RunConfig, *, data_source: str | None = None) -> None:
        super().__init__(cfg, data_source=data_source)
        if cfg.data.tokenizer is not None:
            raise TaskError('the built-in GPT reads bytes; a run with a tokenizer trains task "hf-causal-lm"')
        self.model_config: GPTConfig = model_config(cfg.model.size, block_size=cfg.model.block_size)

    @property
    def block_size(self) -> int:
        """The run's context length (the size's own when the run leaves it unset)."""
        return self.model_config.block_size

    def build_model(self, *, seed: int) -> nn.Module:
        """The GPT at `seed` (drawn on the CPU with a private generator)."""
        return build_model(self.model_config, seed=seed)

    def enable_checkpointing(self, model: nn.Module) -> None:
        """Each transformer block's activations are recomputed in the backward pass."""
        model.checkpointing = True  # type: ignore[assignment]  # a GPT's switch (training/models.py)

    def skeleton(self) -> nn.Module:
        """The GPT on the meta device."""
        return on_meta(lambda: GPT(self.model_config))

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The GPT's logits over the byte vocabulary."""
        logits, _ = model(inputs)
        return logits

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The GPT's own cross-entropy (the same arithmetic, one pass)."""
        _, loss = model(*batch)
        return loss
