"""The built-in GPT family: one clean decoder-only transformer, tiny (CPU) to 1B (GPU).

The model follows nanoGPT (karpathy/nanoGPT ``model.py``): pre-norm blocks, causal
self-attention through ``F.scaled_dot_product_attention``, a 4x GELU MLP, learned position
embeddings and GPT-2 initialisation. The default vocabulary is 256 byte values, so the
built-in corpus needs no tokenizer.

Tied input/output embeddings are one ``nn.Parameter`` used twice (the output head is a plain
``F.linear`` against ``wte.weight``), so every name in ``named_parameters()`` and the
state dict is a distinct tensor: safetensors refuses shared storage, and peers exchange
exactly these named parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

__all__ = ["GPT", "GPTConfig", "MODEL_SIZES", "build_model", "count_params", "model_config", "on_meta"]

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True, kw_only=True, slots=True)
class GPTConfig:
    """Shape of a GPT model. Validated on construction."""

    vocab_size: int = 256  # one token per byte value: the built-in corpus needs no tokenizer
    block_size: int  # context length in tokens (size of the learned position table)
    n_layer: int
    n_head: int
    n_embd: int  # must divide evenly by n_head
    dropout: float = 0.0  # DiLoCo pre-training runs use none; kept for fine-tuning
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


# One AdamW step at batch 16 x block_size, measured on 2 Xeon cores (torch 2.13, CPU):
# tiny 0.25M params ~12 ms, small 1.9M ~115 ms, 10m 10.8M ~1.1 s. "10m" is nanoGPT's
# shakespeare-char shape. "124m" and "350m" are GPT-2 small and medium: with GPT-2's
# 50257-token vocabulary they have 124.4M and 354.8M parameters; with the 256-byte vocabulary
# 85.9M and 303.4M. "1b" is 20 layers of width 2048 (1.02B parameters, head size 128).
MODEL_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=96),
    "small": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=192),
    "10m": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    "124m": GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "350m": GPTConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "1b": GPTConfig(block_size=2048, n_layer=20, n_head=16, n_embd=2048),
}


def model_config(size: str, *, block_size: int | None = None) -> GPTConfig:
    """The config of a named size, optionally with another context length."""
    try:
        config = MODEL_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown model size {size!r}; choose one of: {', '.join(MODEL_SIZES)}") from None
    return config if block_size is None else replace(config, block_size=block_size)


def count_params(config: GPTConfig) -> int:
    """Parameter count of ``GPT(config)``, computed without building it (for the 1B shapes)."""
    d, L = config.n_embd, config.n_layer
    ln = 2 * d  # weight + bias
    attn = d * 3 * d + 3 * d + d * d + d  # qkv projection + output projection, with biases
    mlp = d * 4 * d + 4 * d + 4 * d * d + d
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + config.block_size * d + L * (2 * ln + attn + mlp) + ln + head


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, 4x wide as in GPT-2."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Recompute each block's activations in the backward pass instead of keeping them (less memory, ~1/3
        # more compute): what a small GPU needs for a large model (potluck plan --memory estimates both).
        self.checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation, drawing from ``generator`` (the global RNG when None).

        Weights ~ N(0, 0.02); the two projections that write into the residual stream use
        0.02 / sqrt(2 * n_layer) so the stream's variance does not grow with depth (GPT-2
        paper, section 2.3). Biases start at 0, LayerNorm gains at 1. Tensors are visited in
        ``named_parameters()`` order, one draw each, so a seed fixes every value.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if ".ln_" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                std = residual_std if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std, generator=generator)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position ``[B, T, vocab]`` and, given targets, the mean cross-entropy."""
        _, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        t = self.transformer
        wte = cast(nn.Embedding, t["wte"])
        x = t["drop"](wte(idx) + t["wpe"](pos))
        for block in cast(nn.ModuleList, t["h"]):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = cast(torch.Tensor, checkpoint(block, x, use_reentrant=False))
            else:
                x = block(x)
        x = t["ln_f"](x)
        head = wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        """Number of parameters, embeddings included (each tied tensor counted once)."""
        return sum(p.numel() for p in self.parameters())


def build_model(size_or_config: str | GPTConfig, *, seed: int, device: torch.device | str = "cpu") -> GPT:
    """A freshly initialised GPT whose weights are a pure function of (config, seed).

    The weights are drawn on the CPU with a private generator (the global RNG is untouched)
    and then moved to ``device``, so the same seed gives the same model on any machine.
    The module is first built on the meta device to skip PyTorch's default initialisation,
    which would otherwise run once for nothing (seconds at 1B parameters).
    """
    config = model_config(size_or_config) if isinstance(size_or_config, str) else size_or_config
    model = _skeleton(config)
    model.to_empty(device="cpu")
    model.reset_parameters(generator=torch.Generator(device="cpu").manual_seed(seed))
    return model.to(device)


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes in the model's own order, without building any weights.

    State that travels as safetensors comes back sorted by name; reordering it by this mapping
    gives every node the same tensor order, which the codecs' payloads depend on.
    """
    return {name: tuple(p.shape) for name, p in _skeleton(config).named_parameters()}


# Everything a module's constructor may call to fill its parameters (torch.nn.init's and the tensors' own).
_INITIALISERS = frozenset(
    "normal_ uniform_ trunc_normal_ kaiming_uniform_ kaiming_normal_ xavier_uniform_ xavier_normal_ orthogonal_"
    " constant_ ones_ zeros_ fill_ zero_".split()
)


class _SkipInitialisers(TorchFunctionMode):
    """Inside it, parameter initialisers return their tensor untouched.

    A meta tensor has no values to draw, yet PyTorch routes a random draw on one through its reference
    implementations, whose first use imports torch._dynamo: seconds of start-up in every process, paid
    after the peer joined its first round.
    """

    def __torch_function__(
        self, func: object, types: object, args: tuple[object, ...] = (), kwargs: dict[str, object] | None = None
    ) -> object:
        if getattr(func, "__name__", "") in _INITIALISERS:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))  # type: ignore[operator]  # torch hands any callable here


def on_meta(build: Callable[[], M]) -> M:
    """`build()` on the meta device with no initialiser run: a model's structure, no memory and no values."""
    with torch.device("meta"), _SkipInitialisers():
        return build()


def _skeleton(config: GPTConfig) -> GPT:
    return on_meta(lambda: GPT(config))
