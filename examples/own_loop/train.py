"""Your own PyTorch loop in a potluck run: a transformers Llama trained by a plain loop, with potluck.Optimizer.

Start the run, then join it with this loop (a CLI peer may join the same run next to it):

    potluck aggregator --config examples/llama/run.toml --state-dir /tmp/llama-run --http-port 0
    python examples/own_loop/train.py --join /ip4/127.0.0.1/tcp/PORT/p2p/Qm...   # the line it printed

The loop is yours (model, optimizer, data, clipping); `opt.step()` is where potluck takes part: it counts
the round's inner steps and, at the round's end, sends the signed update and applies the run's aggregate.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import potluck
from potluck.events import encode_event

HERE = Path(__file__).resolve().parent
WINDOW = 128  # the run's model.block_size (examples/llama/run.toml)


def my_text(path: str | None) -> torch.Tensor:
    """This volunteer's own bytes to train on: a file, or some of Python's standard library."""
    if path is not None:
        data = Path(path).read_bytes()
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:60])
    return torch.tensor(list(data), dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--join", required=True, help="the aggregator's multiaddr")
    parser.add_argument("--identity", default="~/.potluck/own-loop.key", help="this peer's key (made if missing)")
    parser.add_argument("--receipts", default="~/.potluck/receipts", help="where its receipts are kept")
    parser.add_argument("--data", help="a text file to train on (default: some of Python's stdlib)")
    parser.add_argument("--max-rounds", type=int, help="leave after this many rounds")
    args = parser.parse_args()

    # The model as the run's task builds it (same architecture: potluck checks), your optimizer, your data.
    config = json.loads((HERE.parent / "llama" / "config.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt = potluck.Optimizer(
        model,
        inner,
        join=[args.join],
        identity=args.identity,
        receipts_dir=args.receipts,
        max_rounds=args.max_rounds,
        on_event=lambda event: print(json.dumps(encode_event(event)), flush=True),
    )
    data = my_text(args.data)
    generator = torch.Generator().manual_seed(0)
    try:
        while not opt.done:
            starts = torch.randint(0, len(data) - WINDOW - 1, (8,), generator=generator)
            windows = torch.stack([data[s : s + WINDOW + 1] for s in starts.tolist()])
            inputs, targets = windows[:, :-1], windows[:, 1:]
            logits = model(input_ids=inputs, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(work=targets.numel(), loss=loss.item())
            opt.zero_grad()
    finally:
        opt.close()


if __name__ == "__main__":
    main()
