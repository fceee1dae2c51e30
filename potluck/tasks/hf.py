"""The `hf-causal-lm` task: any decoder-only architecture `transformers` ships, built from its config.

The run's config carries the model's `transformers` config inline (a `config.json` named at run
creation is read into it), so every node builds the same architecture with
`AutoModelForCausalLM.from_config`; weights come from the run's seed. potluck never contacts a model
hub: the offline switches are set before `transformers` is imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from potluck.protocol.config import RunConfig
from potluck.tasks.base import TaskError
from potluck.tasks.byte_tokenizer import byte_tokenizer_json
from potluck.tasks.language import BYTE_VOCAB, LanguageModelTask
from potluck.training.models import on_meta
from potluck.training.tokenizer import HFTokenizer, save_for_transformers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_BLOCK_SIZE = 1024  # the context when the run sets none and the model allows more


def offline_transformers() -> None:
    """Forbid `transformers` and `huggingface_hub` any hub access (before they are first imported)."""
    for switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[switch] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def hf_config(values: Mapping[str, Any]) -> PretrainedConfig:
    """The `transformers` config `values` describe (their `model_type` names the architecture)."""
    offline_transformers()
    from transformers import AutoConfig

    fields = dict(values)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise TaskError('task.hf_config needs "model_type" (e.g. "llama", "gpt2", "qwen2")')
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as e:
        raise TaskError(f"task.hf_config does not describe a transformers model: {e}") from None
    config.use_cache = False  # training: no key/value cache
    return config


class HFCausalLMTask(LanguageModelTask):
    """A `transformers` causal language model trained on the run's corpus."""

    name = "hf-causal-lm"

    def __init__(self, cfg: RunConfig, *, data_source: str | None = None) -> None:
        super().__init__(cfg, data_source=data_source)
        if cfg.task.hf_config is None:
            raise TaskError('task "hf-causal-lm" needs task.hf_config: the model\'s transformers config')
        self.config = hf_config(cfg.task.hf_config_values())
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        if vocab < BYTE_VOCAB and cfg.data.tokenizer is None:
            raise TaskError(f"task.hf_config.vocab_size is {vocab}; the run's tokens need at least {BYTE_VOCAB}")

    @cached_property
    def block_size(self) -> int:
        """The run's context length, or the model's own up to DEFAULT_BLOCK_SIZE."""
        most = int(getattr(self.config, "max_position_embeddings", 0) or DEFAULT_BLOCK_SIZE)
        if self.cfg.model.block_size is None:
            return min(most, DEFAULT_BLOCK_SIZE)
        if self.cfg.model.block_size > most:
            raise TaskError(f"model.block_size {self.cfg.model.block_size} exceeds the model's {most} positions")
        return self.cfg.model.block_size

    def _build(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_config(self.config)
        except (ValueError, ImportError) as e:
            raise TaskError(f"transformers cannot build this causal LM: {e}") from None
        return model

    def build_model(self, *, seed: int) -> nn.Module:
        """The model with `transformers`' own initialisation, drawn from `seed` (the global RNG is restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._build().float()

    def enable_checkpointing(self, model: nn.Module) -> None:
        """transformers' own activation checkpointing (non-reentrant; its older name before transformers 5)."""
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(  # type: ignore[operator]  # a transformers PreTrainedModel
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    def skeleton(self) -> nn.Module:
        """The model on the meta device."""
        return on_meta(self._build)

    def export(self, model: nn.Module, out: Path, *, run: Mapping[str, Any]) -> list[str]:
        """A `save_pretrained` directory and the run's tokenizer: `from_pretrained(out)` loads both, no potluck."""
        model.save_pretrained(str(out))  # type: ignore[operator]  # a transformers PreTrainedModel
        save_for_transformers(self.tokenizer_json().encode(), out, model_max_length=self.block_size)
        (out / "potluck.json").write_text(json.dumps(dict(run), indent=2) + "\n")
        return sorted(p.name for p in out.iterdir())

    @property
    def model_vocab_size(self) -> int:
        """The config's vocab_size."""
        return int(getattr(self.config, "vocab_size", 0) or 0)

    def tokenizer_json(self) -> str:
        """The run's tokenizer as `tokenizer.json` text (bytes: a byte-level tokenizer whose ids are the bytes)."""
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.data.decode("utf-8")
        return byte_tokenizer_json()

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The model's logits for every position."""
        return model(input_ids=inputs, use_cache=False).logits
