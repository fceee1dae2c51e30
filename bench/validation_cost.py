"""What the validation pipeline costs per update: arrival checks + decode, and the round-close checks.

Builds real signed dct-topk updates for a model of the given size and times, per update, the
envelope checks (signature and payload hash included) plus decoding, and, per round of N updates,
the norm and direction checks and the weight capping (judge_round), and separately the held-out-loss
check (each update applied alone to the base and scored on the config's held_out_batches held-out
batches, as the aggregator does). Best of --repeats.

    python bench/validation_cost.py --sizes tiny,10m --updates 8
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from potluck.aggregator_server.judge import judge_round
from potluck.aggregator_server.validation import RoundContext, check_envelope, decode_update
from potluck.protocol.codecs import make_codec
from potluck.protocol.config import RunConfig
from potluck.protocol.envelope import UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import generate_identity
from potluck.training.data import load_corpus, val_batches
from potluck.training.diloco import load_params
from potluck.training.evaluate import evaluate
from potluck.training.models import build_model, model_config, parameter_shapes


def _best(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _arrive(uploads, ctx, codec, shapes, decoded) -> None:  # noqa: ANN001
    """What the aggregator does with each upload as it arrives: envelope checks, then decode."""
    decoded.clear()
    for update, payload in uploads:
        assert check_envelope(update, payload, ctx) is None
        tensors, rejection = decode_update(payload, codec=codec, spec=shapes)
        assert rejection is None
        decoded.append(tensors)


def _held_out_scorer(cfg: RunConfig, size: str):  # noqa: ANN202
    """The aggregator's held-out score (closing.py's held-out check) for a model of this size."""
    model_cfg = model_config(size)
    model = build_model(model_cfg, seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, max_bytes=cfg.data.max_bytes)
    batches = val_batches(
        corpus.val,
        batch_size=cfg.inner.batch_size,
        block_size=model_cfg.block_size,
        num_batches=cfg.validation.held_out_batches,
    )

    def score(delta: dict[str, torch.Tensor] | None) -> float:
        params = base if delta is None else {n: p - cfg.outer.lr * delta[n] for n, p in base.items()}
        load_params(model, params)
        return evaluate(model, batches, device="cpu")

    return score


def main() -> None:
    """Print one markdown row per model size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,10m")
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = RunConfig()
    off = cfg.with_overrides({"validation.held_out_margin": None})
    codec = make_codec("dct-topk")
    print(
        "| model | parameters | arrival checks + decode, per update | round checks + weights, per round of "
        f"{args.updates} | per update | held-out check ({cfg.validation.held_out_batches} batches), per update |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        shapes = parameter_shapes(model_config(size))
        numel = sum(torch.Size(s).numel() for s in shapes.values())
        generator = torch.Generator().manual_seed(0)
        direction = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
        uploads = []
        for _ in range(args.updates):
            identity = generate_identity()
            delta = {n: d + 0.3 * torch.randn(d.shape, generator=generator) for n, d in direction.items()}
            payload = codec.encode(delta)
            header = UpdateHeader(
                run_id=cfg.run_name, config_hash=cfg.config_hash, round=0, base_version=0,
                peer_public_key=identity.public_key, tokens=1000, inner_steps=30, codec=codec.name,
                payload_bytes=len(payload), payload_sha256=payload_digest(payload), nonce=new_nonce(),
                timestamp_s=time.time(),
            )  # fmt: skip
            uploads.append((sign_update(header, identity), payload))
        ctx = RoundContext(
            run_id=cfg.run_name, config_hash=cfg.config_hash, round=0, version=0, codec=codec.name,
            max_update_bytes=cfg.max_update_bytes, accepted_digests={},
        )  # fmt: skip
        decoded: list[dict[str, torch.Tensor]] = []
        per_update = _best(functools.partial(_arrive, uploads, ctx, codec, shapes, decoded), args.repeats)
        per_update /= args.updates
        judge = functools.partial(judge_round, decoded, [1000] * args.updates, cfg=off, token_cap=10**9)
        per_round = _best(judge, args.repeats)
        with_held_out = functools.partial(
            judge_round, decoded, [1000] * args.updates, cfg=cfg, token_cap=10**9,
            held_out_loss=_held_out_scorer(cfg, size),
        )  # fmt: skip
        held_out = (_best(with_held_out, args.repeats) - per_round) / args.updates
        print(f"| {size} | {numel:,} | {per_update * 1000:.1f} ms | {per_round * 1000:.1f} ms "
              f"| {per_round / args.updates * 1000:.1f} ms | {held_out * 1000:.1f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
