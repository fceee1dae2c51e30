"""Codec throughput, payload size and error on a model-shaped pseudo-gradient.

For a dict of random-normal fp32 tensors shaped like a small GPT (embedding, per-layer matrices
and vectors; 10M parameters by default), times ``encode`` (with error feedback for the sparse
codecs, as peers run them) and ``decode`` per codec, and reports:

- MB/s of fp32 input (4 bytes per parameter) for encode, decode and both together;
- payload bytes per parameter (headers included) and relative L2 error ``||x - x_hat|| / ||x||``
  of one round from an empty residual;
- for the sparse codecs, index bits per kept entry: the Rice streams actually sent versus a
  fixed-width ``log2(chunk)``-bit index.

Random normal data is the worst case for a DCT (white noise has no structure to compact), so
``dct-topk`` and ``topk`` show the same error here; the difference is measured on real
pseudo-gradients by ``potluck simulate``.

    python bench/codec_throughput.py                  # table
    python bench/codec_throughput.py --json --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import struct
import sys
import time

import msgpack
import safetensors.numpy
import torch

from potluck.protocol.codecs import Codec, available_codecs, make_codec, spec_of


def model_like(num_params: int, *, seed: int, device: str) -> dict[str, torch.Tensor]:
    """A GPT-shaped dict: two blocks (qkv, proj, mlp in/out, norms) and an embedding that fills the rest.

    d_model is the largest multiple of 64 whose two blocks (24 d^2) take at most 65% of the
    parameters: 512 for 10M.
    """
    d = max(64, int(math.sqrt(0.65 * num_params / 24)) // 64 * 64)
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(2):
        shapes |= {
            f"h.{i}.ln1.weight": (d,),
            f"h.{i}.attn.qkv.weight": (3 * d, d),
            f"h.{i}.attn.proj.weight": (d, d),
            f"h.{i}.ln2.weight": (d,),
            f"h.{i}.mlp.fc.weight": (4 * d, d),
            f"h.{i}.mlp.proj.weight": (d, 4 * d),
        }
    shapes["ln_f.weight"] = (d,)
    rest = num_params - sum(math.prod(s) for s in shapes.values())
    shapes = {"wte.weight": (max(1, rest // d), d)} | shapes
    return {name: torch.randn(shape, generator=gen).to(device) for name, shape in shapes.items()}


def index_bits(payload: bytes, codec: Codec, numel: int) -> dict[str, float]:
    """Index bits per kept entry of a sparse payload: Rice (as sent) and fixed-width log2(chunk)."""
    (header_len,) = struct.unpack_from("<I", payload, 5)
    msgpack.unpackb(payload[9 : 9 + header_len])  # check the framing is what we think
    arrays = safetensors.numpy.load(payload[9 + header_len :])
    kept = math.ceil(numel / codec.chunk) * codec.k
    rice = 8 * (arrays["idx_unary"].size + arrays["idx_rem"].size) / kept
    return {
        "rice_bits_per_index": rice,
        "fixed_bits_per_index": math.log2(codec.chunk),
        "rice_r": int(arrays["rice_r"][0]),
    }


def parse_codec(text: str) -> tuple[str, Codec]:
    """``name`` or ``name:key=value:key=value`` (e.g. ``topk:chunk=4096``) -> (label, codec)."""
    name, *pairs = text.split(":")
    params: dict[str, object] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        for kind in (int, float, str):
            try:
                params[key] = kind(raw)
                break
            except ValueError:
                continue
    return text, make_codec(name, params)


def bench_codec(codec: Codec, tensors: dict[str, torch.Tensor], *, repeats: int) -> dict[str, float]:
    """Median encode and decode seconds over ``repeats`` (after one warm-up), size and error."""
    spec = spec_of(tensors)
    numel = sum(t.numel() for t in tensors.values())
    sparse = codec.name in ("topk", "dct-topk")
    payload = codec.encode(tensors, {} if sparse else None)  # warm-up; also the one-round error
    decoded = codec.decode(payload, spec)
    x = torch.cat([t.reshape(-1).cpu() for t in tensors.values()])
    x_hat = torch.cat([t.reshape(-1) for t in decoded.values()])
    rel_error = float((x - x_hat).norm() / x.norm())
    state: dict[str, torch.Tensor] | None = {} if sparse else None
    encode_s, decode_s = [], []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        payload = codec.encode(tensors, state)
        sync()
        encode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        codec.decode(payload, spec)
        decode_s.append(time.perf_counter() - start)
    enc, dec = statistics.median(encode_s), statistics.median(decode_s)
    mb = 4 * numel / 1e6
    row = {
        "codec": codec.name,
        "params": numel,
        "encode_MBps": mb / enc,
        "decode_MBps": mb / dec,
        "both_MBps": mb / (enc + dec),
        "encode_s": enc,
        "decode_s": dec,
        "bytes_per_param": len(payload) / numel,
        "payload_bytes": len(payload),
        "rel_l2_error": rel_error,
    }
    if sparse:
        row |= index_bits(payload, codec, numel)
    return row


def sync() -> None:
    """Wait for queued GPU work, so that timings cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000, help="model size in parameters")
    parser.add_argument("--repeats", type=int, default=3, help="timed encode+decode rounds per codec")
    parser.add_argument(
        "--codecs",
        default=",".join(available_codecs()),
        help="comma-separated codecs, each a name or name:key=value:... (e.g. topk:chunk=4096)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the input tensors live (encode runs there)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = model_like(args.params, seed=args.seed, device=args.device)
    rows = []
    for label, codec in map(parse_codec, args.codecs.split(",")):
        rows.append(bench_codec(codec, tensors, repeats=args.repeats) | {"codec": label})
    context = {"device": args.device, "torch_threads": torch.get_num_threads(), "repeats": args.repeats}
    if args.json:
        json.dump({"context": context, "results": rows}, sys.stdout, indent=2)
        print()
        return 0
    width = max(9, *(len(r["codec"]) for r in rows))
    print(f"{rows[0]['params']:,} params, {len(tensors)} tensors; {context}")
    print(
        f"{'codec':<{width}} {'enc MB/s':>9} {'dec MB/s':>9} {'both MB/s':>9} {'bytes/param':>12} {'rel L2 err':>10}"
        f" {'idx bits (rice/fixed)':>22}"
    )
    for r in rows:
        idx = f"{r['rice_bits_per_index']:.2f} / {r['fixed_bits_per_index']:.0f}" if "rice_r" in r else ""
        print(
            f"{r['codec']:<{width}} {r['encode_MBps']:>9.0f} {r['decode_MBps']:>9.0f} {r['both_MBps']:>9.0f}"
            f" {r['bytes_per_param']:>12.5f} {r['rel_l2_error']:>10.4f} {idx:>22}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
