"""A peer's peak memory while it trains, estimated from the model's shape before anything is built.

`potluck plan --memory` answers "does a 24 GB card fit this run?" before a volunteer joins. The estimate
counts what a potluck peer holds (peer/trainer.py, peer/records.py, training/diloco.py):

* **parameters** in fp32 (the master weights; bf16 autocast casts on the fly and keeps no bf16 copy);
* **gradients**, one per parameter in its dtype;
* **AdamW state**: two fp32 moments per parameter;
* **outer state**, four fp32 copies of the model: the peer's copy of the master parameters, its copy of the
  outer Nesterov momentum (the peer applies every aggregate itself and checks the checksum), the round's
  base and the codec's error-feedback residual. potluck keeps them in CPU memory today; ``outer_state_on_cpu``
  says where the estimate puts them;
* **round-end copies**: while a round's update is encoded, five more fp32 copies live beside the outer state
  (the snapshot of the model, the delta, the flattened delta with the residual added, its decoded payload and
  the new residual, in ``Codec.encode``);
* **activations** at the micro-batch: what autograd saves for the backward pass (below);
* **logits**: ``micro_batch * seq * vocab`` values, the log-softmax that cross-entropy saves, and in the
  backward pass their two gradients. At a 256-token vocabulary they are small; at 32k-150k they can dominate;
* **workspace**: the backward pass's gradients of one layer's activations, and AdamW's per-tensor temporaries
  (two tensors of the largest parameter on CPU; none for the fused CUDA kernel potluck uses on GPU).

Not every term is live at once, so the peak is the largest of four moments of a step: the end of the
forward pass (last step's gradients are still held: ``zero_grad`` runs after the forward pass), the start of
the backward pass (old gradients freed, all activations and the logits' gradients live), the optimizer step,
and the end of a round (encoding). The estimate names the moment and lists the terms live at it, so its
rows add up to the total.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"), who count ``s*b*h*(34 + 5*a*s/h)`` bytes per layer in 16-bit with dropout. potluck's models have no
dropout (no masks), and attention through ``scaled_dot_product_attention`` (flash or memory-efficient
kernels) keeps no ``a*s*s`` probabilities, only a log-sum-exp per row. Counting each saved tensor instead,
per layer and per token (h: hidden size, f: feed-forward width, kv: key/value width):

* built-in GPT (LayerNorm, GELU MLP): the inputs of the two LayerNorms (2h, always fp32: the residual stream
  stays fp32 under autocast), and in the compute dtype the inputs of the four linears (h, h, h, f), the
  q/k/v projection's output (3h) and the GELU's input (f); the attention kernel writes its output in
  (batch, token, head) order, so it is the output projection's input, one tensor. That is
  ``2h*4 + (6h + 2f)*c`` bytes, c = 4 in fp32 and 2 under bf16 autocast: at f = 4h and c = 2, 36h, which is
  Korthikanti's 34h less the two dropout masks (2h) plus 4h for the fp32 LayerNorm inputs;
* Llama-style (RMSNorm, gated SiLU MLP): RMSNorm saves its input and the normalised values (2 x 2h, fp32),
  and in the compute dtype: the two norms' outputs (2h), the rotated q and k and the v (h + 2kv), the
  attention output (h), and the MLP's gate, SiLU, up and product (4f).

With activation checkpointing only each layer's input (h, fp32) is kept, and one layer's activations are
rebuilt at a time in the backward pass, once the logits' gradients are freed. Eager attention (no fused
kernel) adds the softmax probabilities, ``a*s*s`` per layer in fp32 plus their compute-dtype copy.

Besides the tensors, the framework's runtime: the CUDA context on a GPU, PyTorch's kernels and libraries on a
CPU. On a CPU, glibc may keep freed activation memory resident beyond the estimate (bench/memory_estimate.py
measures how much: 20-28% more at 10M parameters).

Pure arithmetic on plain values: the adapters at the bottom turn a built-in GPT size or a Hugging Face
config into a `ModelShape` (the HF one by building the model on the meta device, never downloading).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from potluck.errors import PotluckError

if TYPE_CHECKING:
    from potluck.training.models import GPTConfig

__all__ = [
    "CPU_RUNTIME_BYTES",
    "CUDA_CONTEXT_BYTES",
    "HEADROOM",
    "MemoryEstimate",
    "MemoryTerms",
    "ModelShape",
    "TrainingSetup",
    "estimate_memory",
    "fits",
    "gpt_shape",
    "hf_shape",
    "load_hf_config",
]

FP32_BYTES = 4
BF16_BYTES = 2
OUTER_COPIES = 4  # master parameters, outer momentum, round base, error-feedback residual
ROUND_END_COPIES = 5  # snapshot, delta, delta + residual (flat), its decoded payload, the new residual
# What a CUDA process holds before its first tensor: the context, cuBLAS's workspace and loaded kernels
# (typically 0.3-0.6 GiB on recent GPUs and drivers); torch.cuda.max_memory_allocated does not see it.
CUDA_CONTEXT_BYTES = 512 * 2**20
# What PyTorch on CPU pages in at its first training step beyond the tensors: kernels and libraries
# (oneDNN, MKL, OpenMP). Measured 90-96 MiB with torch 2.13 on x86 (bench/memory_estimate.py, warm-up run).
CPU_RUNTIME_BYTES = 96 * 2**20
# PyTorch's caching allocator reserves more than it hands out (rounding, fragmentation): keep a tenth free.
HEADROOM = 0.10


class HFConfigError(PotluckError):
    """A Hugging Face config that cannot be read or built (one line, for the user)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelShape:
    """The figures of a decoder-only transformer the estimate needs, from whichever source described it."""

    name: str  # what it is, for the table: "gpt 124m", "llama (config.json)"
    family: Literal["gpt", "llama"]  # which activation count applies: LayerNorm + GELU, or RMSNorm + gated MLP
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int  # key/value heads (fewer than n_head with grouped-query attention)
    ffn: int  # feed-forward width
    vocab: int
    seq: int  # the context length it trains at
    params: int  # exact count, each tied tensor once
    largest_param: int  # elements of the largest parameter tensor: AdamW's CPU temporaries are this size
    eager_attention: bool = False  # attention without a fused kernel keeps its a*s*s probabilities

    def __post_init__(self) -> None:
        for name in ("n_layer", "hidden", "n_head", "n_kv_head", "ffn", "vocab", "seq", "params", "largest_param"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(
                f"ModelShape: hidden ({self.hidden}) must divide by n_head ({self.n_head}) and n_head by "
                f"n_kv_head ({self.n_kv_head})"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingSetup:
    """How the peer trains: where, at which micro-batch, and which memory savers are on."""

    micro_batch: int  # sequences per forward/backward pass
    seq: int | None = None  # tokens per sequence; None: the model's own context length
    device: Literal["cpu", "cuda"] = "cuda"
    bf16_autocast: bool | None = None  # None: on for CUDA (potluck's peer uses it there), off on CPU
    activation_checkpointing: bool = False
    outer_state_on_cpu: bool = False  # the outer state and round-end copies in host RAM (ignored on CPU)
    outer_momentum: bool = True  # the run's outer step is Nesterov (False: plain averaging, no momentum)

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {self.micro_batch}")
        if self.seq is not None and self.seq < 1:
            raise ValueError(f"seq must be at least 1, got {self.seq}")

    @property
    def autocast(self) -> bool:
        """Whether the forward pass runs under bf16 autocast."""
        return self.device == "cuda" if self.bf16_autocast is None else self.bf16_autocast


Phase = Literal["forward", "backward", "optimizer step", "round end"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryTerms:
    """Bytes by term: either each term's own size, or what of it is live at one moment."""

    parameters: int
    gradients: int
    optimizer: int  # AdamW's two moments
    outer_state: int  # master copy, outer momentum, round base, residual
    round_end: int  # the copies encoding an update makes
    activations: int
    logits: int
    workspace: int  # backward gradients of one layer, or the optimizer's temporaries

    @property
    def total(self) -> int:
        """The sum of the terms."""
        return sum(self.rows().values())

    def rows(self) -> dict[str, int]:
        """Term name -> bytes, in table order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """A peer's memory while it trains: each term's size, and the peak on the device with what is live then."""

    sizes: MemoryTerms  # each term's own size (the outer state and round-end copies wherever they live)
    at_peak: MemoryTerms  # what is live on the training device at its peak; sums to device_bytes
    phase: Phase  # the moment of the peak
    device_bytes: int  # the tensors' peak on the training device (the host RAM when it is the CPU)
    runtime: int  # what the framework holds there besides: the CUDA context, or PyTorch's CPU kernels
    host_bytes: int  # outer state and round-end copies kept in host RAM besides (0 when training on CPU)
    micro_batch: int
    seq: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def estimate_memory(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """The peak memory of a peer training `shape` as `setup` says; see the module's docstring for each term."""
    seq = setup.seq or shape.seq
    tokens = setup.micro_batch * seq  # s*b
    c = BF16_BYTES if setup.autocast else FP32_BYTES
    p = shape.params * FP32_BYTES
    outer = (OUTER_COPIES - (0 if setup.outer_momentum else 1)) * p
    round_end = ROUND_END_COPIES * p
    outer_on_device = setup.device == "cpu" or not setup.outer_state_on_cpu

    activations, rebuilt = _activation_bytes(
        shape, tokens=tokens, seq=seq, micro_batch=setup.micro_batch, c=c, setup=setup
    )
    logit_values = tokens * shape.vocab
    # Forward: the logits (compute dtype), a transient fp32 copy under autocast, the saved log-softmax (fp32).
    logits_forward = logit_values * (c + (FP32_BYTES if c != FP32_BYTES else 0) + FP32_BYTES)
    # Backward, first node: the logits and the log-softmax, plus the gradients of both (fp32).
    logits_backward = logit_values * (c + 3 * FP32_BYTES)
    # The top layer's backward: the residual stream's gradient twice (fp32) and two f-wide gradients.
    layer_workspace = tokens * (2 * shape.hidden * FP32_BYTES + 2 * shape.ffn * c)
    optimizer_workspace = 0 if setup.device == "cuda" else 2 * shape.largest_param * FP32_BYTES
    sizes = MemoryTerms(
        parameters=p,
        gradients=p,
        optimizer=2 * p,
        outer_state=outer,
        round_end=round_end,
        activations=activations + rebuilt,
        logits=logits_backward,
        workspace=max(layer_workspace, optimizer_workspace),
    )

    held = {"parameters": p, "optimizer": 2 * p, "outer_state": outer if outer_on_device else 0}
    none = {"gradients": 0, "round_end": 0, "activations": 0, "logits": 0, "workspace": 0}
    # The logits stay referenced by the caller through the backward pass; the rest of them is freed once
    # used, before a checkpointed layer is rebuilt.
    backward_top = (
        {"activations": activations, "logits": logits_backward}
        if logits_backward >= logit_values * c + rebuilt + layer_workspace
        else {"activations": activations + rebuilt, "logits": logit_values * c, "workspace": layer_workspace}
    )
    live: dict[Phase, dict[str, int]] = {
        "forward": {"gradients": p, "activations": activations, "logits": logits_forward},
        "backward": backward_top,
        "optimizer step": {"gradients": p, "workspace": optimizer_workspace},
        "round end": {"gradients": p, "round_end": round_end if outer_on_device else 0},
    }
    moments = [(phase, MemoryTerms(**{**held, **none, **terms})) for phase, terms in live.items()]
    phase, at_peak = max(moments, key=lambda moment: moment[1].total)
    return MemoryEstimate(
        sizes=sizes,
        at_peak=at_peak,
        phase=phase,
        device_bytes=at_peak.total,
        runtime=CUDA_CONTEXT_BYTES if setup.device == "cuda" else CPU_RUNTIME_BYTES,
        host_bytes=0 if outer_on_device else outer + round_end,
        micro_batch=setup.micro_batch,
        seq=seq,
    )


def _activation_bytes(
    shape: ModelShape, *, tokens: int, seq: int, micro_batch: int, c: int, setup: TrainingSetup
) -> tuple[int, int]:
    """What autograd keeps from the forward pass, and what checkpointing rebuilds of one layer in the backward.

    At `tokens` = micro-batch x sequence length. The attention kernels write their output in (batch, token,
    head) order, so the transpose before the output projection is free: one tensor, counted once.
    """
    h, f, r = shape.hidden, shape.ffn, FP32_BYTES  # r: the residual stream's bytes, fp32 under autocast too
    kv = shape.n_kv_head * (h // shape.n_head)
    if shape.family == "gpt":
        per_token = 2 * h * r + (6 * h + 2 * f) * c
        final = h * r + h * c  # ln_f's input, and its output the head reads
    else:
        per_token = 4 * h * r + (4 * h + 2 * kv + 4 * f) * c
        final = 2 * h * r + h * c
    per_token += shape.n_head * FP32_BYTES  # the attention kernel's log-sum-exp per head
    layer = tokens * per_token
    if shape.eager_attention:
        probs = shape.n_head * seq * seq * micro_batch
        layer += probs * (FP32_BYTES + (c if c != FP32_BYTES else 0))
    if setup.activation_checkpointing:
        return shape.n_layer * tokens * h * r + tokens * final, layer
    return shape.n_layer * layer + tokens * final, 0


def fits(estimate: MemoryEstimate, *, device_memory_bytes: int) -> bool:
    """Whether the peak and the runtime fit a device of `device_memory_bytes`, keeping `HEADROOM` free."""
    return estimate.device_bytes + estimate.runtime <= device_memory_bytes * (1 - HEADROOM)


# ---------------------------------------------------------------------------------------------- adapters


def gpt_shape(config: GPTConfig, *, name: str = "gpt") -> ModelShape:
    """The shape of a built-in GPT (potluck.training.models); exact, from its skeleton on the meta device."""
    from potluck.training.models import parameter_shapes

    shapes = parameter_shapes(config)
    return ModelShape(
        name=name,
        family="gpt",
        n_layer=config.n_layer,
        hidden=config.n_embd,
        n_head=config.n_head,
        n_kv_head=config.n_head,
        ffn=4 * config.n_embd,
        vocab=config.vocab_size,
        seq=config.block_size,
        params=sum(math.prod(s) for s in shapes.values()),
        largest_param=max(math.prod(s) for s in shapes.values()),
    )


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (or the directory holding one) as a dict; HFConfigError when unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFConfigError(f"{path}: no such file; give a Hugging Face config.json or its directory") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFConfigError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: a config.json holds one JSON object, got {type(data).__name__}")
    return data


def hf_shape(config: Mapping[str, Any], *, name: str = "hf") -> ModelShape:
    """The shape of a Hugging Face causal LM given as a config dict, counted on the meta device (no download).

    The model is built with ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``: every
    parameter's shape is exact (tied embeddings counted once) and no memory is allocated. The hub is never
    contacted (the offline switches are set before transformers is imported).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(config)
    model_type = settings.pop("model_type", None)
    if not isinstance(model_type, str):
        raise HFConfigError(f'{name}: the config names no model_type (e.g. "llama"); it is needed to build it')
    try:
        hf_config = AutoConfig.for_model(model_type, **settings)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise HFConfigError(f"{name}: transformers cannot build a causal LM from it: {e}") from None
    params = {id(p): p.numel() for p in model.parameters()}  # parameters() yields a tied tensor once already
    names = [n for n, _ in model.named_parameters()]
    hidden = int(hf_config.hidden_size)
    n_head = int(hf_config.num_attention_heads)
    ffn = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden
    return ModelShape(
        name=name,
        family="llama" if any("gate_proj" in n or "gate_up_proj" in n for n in names) else "gpt",
        n_layer=int(hf_config.num_hidden_layers),
        hidden=hidden,
        n_head=n_head,
        n_kv_head=int(getattr(hf_config, "num_key_value_heads", None) or n_head),
        ffn=int(ffn),
        vocab=int(hf_config.vocab_size),
        seq=int(getattr(hf_config, "max_position_embeddings", None) or 2048),
        params=sum(params.values()),
        largest_param=max(params.values()),
        eager_attention=getattr(hf_config, "_attn_implementation", None) == "eager",
    )
