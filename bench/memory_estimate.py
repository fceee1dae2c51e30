"""`potluck plan --memory`'s estimate against the measured peak of real training steps, as a peer takes them.

Each case runs in a fresh process, so one case's freed memory cannot hide another's. The child builds the
model, then holds what a peer holds: its copy of the master parameters and of the outer momentum, the round's
base and an error-feedback residual (fp32 copies of the model, in CPU memory as potluck keeps them), and the
inner AdamW from `make_inner_optimizer`. It takes `--steps` inner steps with `inner_step` (bf16 autocast on a
GPU that has it, as the peer), then ends the round: a snapshot of the model, the delta from the base, and its
encoding with the run's default codec and error feedback.

Measured:

* on CPU, the process's peak resident memory (``ru_maxrss``) less its resident memory just before the model
  is built (after every import): torch's tensors on CPU go through malloc, not tracemalloc. It is compared
  with the estimate's tensors plus PyTorch's CPU runtime (the kernels and libraries the first step pages
  in). Each case runs twice: with glibc's defaults, and with ``MALLOC_TRIM_THRESHOLD_=0``, which makes
  glibc give freed heap memory back at once (and stops it raising its mmap threshold), so the resident
  memory follows what PyTorch holds; the difference is what glibc keeps of freed activations;
* on CUDA, ``torch.cuda.max_memory_allocated`` (the outer state stays in CPU memory and is not counted there,
  as the estimate's ``outer_state_on_cpu`` says).

The cases: the built-in "10m" GPT, and a ~10M-parameter Llama built by transformers from a config (with and
without activation checkpointing), all at micro-batch 8 and sequence 256.

    python bench/memory_estimate.py                 # CPU, about four minutes on 2 cores
    python bench/memory_estimate.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

LLAMA_10M: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 688,
    "vocab_size": 8000,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
CASES = {
    "gpt-10m": {"model": "10m", "checkpointing": False},
    "llama-10m": {"model": "llama", "checkpointing": False},
    "llama-10m-ckpt": {"model": "llama", "checkpointing": True},
}


def _rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(case: str, *, device_name: str, micro_batch: int, seq: int, steps: int) -> dict[str, int]:
    """Run one case in this process and return its measured peak (bytes above the pre-build baseline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from potluck.protocol.codecs import make_codec
    from potluck.protocol.config import RunConfig
    from potluck.training.diloco import inner_step, make_inner_optimizer, snapshot
    from potluck.training.models import build_model

    class CausalLM(nn.Module):
        """A transformers model with the built-in GPT's calling convention: (logits, loss) from (x, y)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(input_ids=idx, use_cache=False).logits
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    spec = CASES[case]
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    vocab = 256 if spec["model"] == "10m" else LLAMA_10M["vocab_size"]
    batches = [
        (torch.randint(0, vocab, (micro_batch, seq)), torch.randint(0, vocab, (micro_batch, seq)))
        for _ in range(steps)
    ]
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    baseline_rss, baseline_peak = _rss_bytes(), _peak_rss_bytes()

    model: nn.Module
    if spec["model"] == "10m":
        model = build_model("10m", seed=0, device=device)
    else:
        torch.manual_seed(0)
        settings = dict(LLAMA_10M)
        hf = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(settings.pop("model_type"), **settings), dtype=torch.float32
        )
        if spec["checkpointing"]:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = CausalLM(hf).to(device)
    model.train()
    # What a peer holds besides its model, all fp32 on the CPU: the master copy, the outer momentum, the base.
    master = snapshot(model, device="cpu")
    held = [master, {name: torch.zeros_like(t) for name, t in master.items()}]  # the outer momentum beside it
    base = snapshot(model, device="cpu")
    residual = {name: torch.zeros_like(t) for name, t in master.items()}  # the error feedback of earlier rounds
    optimizer = make_inner_optimizer(model, lr=3e-4)
    for batch in batches:
        inner_step(model, optimizer, batch, lr=3e-4, autocast=True)
    current = snapshot(model, device="cpu")
    delta = {name: base[name] - current[name] for name in base}
    make_codec(RunConfig().codec.name, RunConfig().codec.params).encode(delta, residual)
    assert len(held) == 2  # the master copy and the momentum were held to the end
    if cuda:
        return {"measured": torch.cuda.max_memory_allocated(device) - baseline}
    peak = _peak_rss_bytes()
    if peak <= baseline_peak:
        raise RuntimeError("the imports' peak was never passed: the measurement says nothing")
    return {"measured": peak - baseline_rss, "baseline_rss": baseline_rss}


def estimate(case: str, *, device_name: str, micro_batch: int, seq: int) -> tuple[str, int, int]:
    """(model name, parameters, estimated peak bytes) for a case: on CPU with PyTorch's runtime, which RSS sees."""
    from potluck.planning.memory import TrainingSetup, estimate_memory, gpt_shape, hf_shape
    from potluck.training.models import model_config

    spec = CASES[case]
    shape = gpt_shape(model_config("10m"), name="gpt 10m") if spec["model"] == "10m" else hf_shape(LLAMA_10M)
    cuda = device_name.startswith("cuda")
    setup = TrainingSetup(
        micro_batch=micro_batch,
        seq=seq,
        device="cuda" if cuda else "cpu",
        activation_checkpointing=bool(spec["checkpointing"]),
        outer_state_on_cpu=cuda,
    )
    estimated = estimate_memory(shape, setup)
    return shape.name, shape.params, estimated.device_bytes + (0 if cuda else estimated.runtime)


def measure(case: str, args: argparse.Namespace, *, trim: bool) -> dict[str, int]:
    """One case in a fresh process; `trim`: glibc returns freed heap memory at once (MALLOC_TRIM_THRESHOLD_=0)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if trim:
        env["MALLOC_TRIM_THRESHOLD_"] = "0"
    flags = ["--device", args.device, "--micro-batch", str(args.micro_batch), "--seq", str(args.seq)]
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, *flags, "--steps", str(args.steps)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Run every case in its own process and print estimate, measurement and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", action="store_true", help="one JSON object per case instead of the table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measured = child(
            args.child, device_name=args.device, micro_batch=args.micro_batch, seq=args.seq, steps=args.steps
        )
        print(json.dumps(measured))
        return
    cpu = args.device == "cpu"
    if not args.json:
        trimmed = f"{'trim=0 MiB':>12}{'est/meas':>10}" if cpu else ""
        print(
            f"{'case':<16}{'params':>12}{'micro-batch':>12}{'seq':>6}{'estimated MiB':>15}{'measured MiB':>14}"
            f"{'est/meas':>10}{trimmed}"
        )
    for case in args.cases.split(","):
        name, params, estimated = estimate(case, device_name=args.device, micro_batch=args.micro_batch, seq=args.seq)
        default = measure(case, args, trim=False)["measured"]
        trim = measure(case, args, trim=True)["measured"] if cpu else None
        if args.json:
            row = {"case": case, "model": name, "params": params, "micro_batch": args.micro_batch, "seq": args.seq}
            row |= {"device": args.device, "estimated": estimated, "measured": default, "ratio": estimated / default}
            if trim is not None:
                row |= {"measured_trim0": trim, "ratio_trim0": estimated / trim}
            print(json.dumps(row))
        else:
            tail = f"{trim / 2**20:>12.1f}{estimated / trim:>10.2f}" if trim is not None else ""
            print(
                f"{case:<16}{params:>12,}{args.micro_batch:>12}{args.seq:>6}{estimated / 2**20:>15.1f}"
                f"{default / 2**20:>14.1f}{estimated / default:>10.2f}{tail}"
            )


if __name__ == "__main__":
    from potluck.lab.children import sigterm_unwinds

    with sigterm_unwinds():  # SIGTERM ends the measuring child too (subprocess.run kills it on the way out)
        main()
