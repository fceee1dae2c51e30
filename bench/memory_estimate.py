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
  in). Each case runs three times: with glibc's defaults (as a peer runs), as a peer with
  ``--return-memory`` runs (``potluck.training.host_memory``: glibc's mmap threshold fixed at 4 MiB, so a
  step's large freed tensors go back to the system), and with ``MALLOC_TRIM_THRESHOLD_=0`` (glibc gives any
  freed heap memory back at once). The difference between the defaults and the others is what glibc keeps
  of freed activations. The inner steps' time is reported too: what returning memory costs (noisy with the
  default 3 steps: use ``--steps 10`` and repeat for timing);
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
import time
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


def child(
    case: str, *, device_name: str, micro_batch: int, seq: int, steps: int, return_memory: bool
) -> dict[str, float]:
    """Run one case in this process: its measured peak (bytes above the pre-build baseline), its steps' time."""
    if return_memory:
        from potluck.training.host_memory import return_freed_memory

        assert return_freed_memory(), "not glibc: --return-memory does nothing here"
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
    started = time.perf_counter()
    for batch in batches:
        inner_step(model, optimizer, batch, lr=3e-4, autocast=True)
    if cuda:
        torch.cuda.synchronize(device)
    steps_s = time.perf_counter() - started
    current = snapshot(model, device="cpu")
    delta = {name: base[name] - current[name] for name in base}
    make_codec(RunConfig().codec.name, RunConfig().codec.params).encode(delta, residual)
    assert len(held) == 2  # the master copy and the momentum were held to the end
    if cuda:
        return {"measured": torch.cuda.max_memory_allocated(device) - baseline, "steps_s": steps_s}
    peak = _peak_rss_bytes()
    if peak <= baseline_peak:
        raise RuntimeError("the imports' peak was never passed: the measurement says nothing")
    return {"measured": peak - baseline_rss, "baseline_rss": baseline_rss, "steps_s": steps_s}


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


def measure(case: str, args: argparse.Namespace, *, malloc: str) -> dict[str, float]:
    """One case in a fresh process; `malloc`: "defaults" (as a peer runs), "return" (--return-memory) or "trim0"."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc == "trim0":
        env["MALLOC_TRIM_THRESHOLD_"] = "0"
    flags = ["--device", args.device, "--micro-batch", str(args.micro_batch), "--seq", str(args.seq)]
    if malloc == "return":
        flags.append("--return-memory")
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, *flags, "--steps", str(args.steps)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Run every case in its own process under each malloc setting; print estimate, measurements and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", action="store_true", help="one JSON object per case instead of the table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--return-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measured = child(
            args.child,
            device_name=args.device,
            micro_batch=args.micro_batch,
            seq=args.seq,
            steps=args.steps,
            return_memory=args.return_memory,
        )
        print(json.dumps(measured))
        return
    settings = ("defaults", "return", "trim0") if args.device == "cpu" else ("defaults",)
    if not args.json:
        columns = "".join(f"{s + ' MiB':>15}{'est/meas':>9}{'steps s':>8}" for s in settings)
        print(f"{'case':<16}{'params':>12}{'micro-batch':>12}{'seq':>6}{'estimated MiB':>15}{columns}")
    for case in args.cases.split(","):
        name, params, estimated = estimate(case, device_name=args.device, micro_batch=args.micro_batch, seq=args.seq)
        found = {setting: measure(case, args, malloc=setting) for setting in settings}
        if args.json:
            row = {"case": case, "model": name, "params": params, "micro_batch": args.micro_batch, "seq": args.seq}
            row |= {"device": args.device, "estimated": estimated}
            for setting, result in found.items():
                row |= {f"measured_{setting}": result["measured"], f"ratio_{setting}": estimated / result["measured"]}
                row |= {f"steps_s_{setting}": round(result["steps_s"], 3)}
            print(json.dumps(row))
        else:
            cells = "".join(
                f"{r['measured'] / 2**20:>15.1f}{estimated / r['measured']:>9.2f}{r['steps_s']:>8.2f}"
                for r in found.values()
            )
            print(f"{case:<16}{params:>12,}{args.micro_batch:>12}{args.seq:>6}{estimated / 2**20:>15.1f}{cells}")


if __name__ == "__main__":
    from potluck.lab.children import sigterm_unwinds

    with sigterm_unwinds():  # SIGTERM ends the measuring child too (subprocess.run kills it on the way out)
        main()
