"""How much one aggregator takes in: real signed updates through its round keeper, then a real round close.

An in-process load generator (no network: what is measured is the aggregator's own work, not a link's):

1. Arrival. `--distinct` peers each encode a random pseudo-gradient of the model with the run's codec at
   the given upload density, sign it, and submit it to the server's round keeper, `RoundKeeper.submit`
   (the envelope's parsing, signature and payload hash, the round's checks, decoding, the spool's fsync'd
   write; the stream handler around it only reads the frame and signs the receipt). Reported: updates/s
   and payload MB/s, one update after another (a real aggregator decodes in a worker thread and takes
   MAX_UPLOADS at once).
2. Close. The round then holds N accepted updates (N = each of `--peers`): the distinct ones, and as many
   more as needed that reuse their decoded tensors under other keys (the statistics, the held-out check,
   the aggregation and the checkpoint do the same work for a copy as for a new update; only memory is
   saved). `AggregatorServer.close` is timed: judging (norm, direction, held-out checks; the generated updates
   share a direction plus noise, as honest peers' do; the held-out check may still drop some, after
   scoring them), the ledger rows,
   the token-weighted mean, the aggregate's encoding, the checkpoint, the new state's held-out loss.

A round of N peers then costs about N / (updates/s) + close(N) of aggregator time, however fast the links.

    python bench/aggregator_ingest.py --sizes 10m --peers 16,64,256 --out bench/results/aggregator-ingest
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from potluck.aggregator_server.keeper import Upload
from potluck.aggregator_server.rounds import Accepted
from potluck.aggregator_server.server import AggregatorServer, ServerOptions
from potluck.protocol.config import RunConfig
from potluck.protocol.density import round_codecs
from potluck.protocol.envelope import SignedUpdate, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import generate_identity, public_key_to_hex


def _server(size: str, density: float, state_dir: Path, *, held_out: bool = True, shards: int = 1) -> AggregatorServer:
    """An aggregator of the run; with `shards` > 1, the one that owns shard 0 (the largest or about so)."""
    identity = generate_identity()
    overrides: dict[str, object] = {"model.size": size, "rounds": 4, "data.max_bytes": 2_000_000}
    overrides |= {"codec.params.density": density} | ({} if held_out else {"validation.held_out_margin": "none"})
    if shards > 1:
        keys = [identity.public_key, *(generate_identity().public_key for _ in range(shards - 1))]
        overrides |= {"shards": shards, "aggregator_keys": [public_key_to_hex(k) for k in keys]}
    cfg = RunConfig().with_overrides(overrides, source="bench")
    return AggregatorServer(cfg, identity, ServerOptions(state_dir=state_dir, eval_batches=1), on_event=lambda e: None)


def _updates(server: AggregatorServer, count: int) -> list[tuple[Any, bytes]]:
    """`count` distinct signed updates for the server's open round, each from its own key."""
    cfg = server.cfg
    codec, _ = round_codecs(cfg, server.master.density)
    shapes = server.master.spec  # the tensors this aggregator owns (its shard's)
    shared = torch.Generator().manual_seed(0)
    common = {name: torch.randn(shape, generator=shared) for name, shape in shapes.items()}
    made = []
    for i in range(count):
        # honest peers agree on a direction and differ in noise: the round's checks keep them all
        generator = torch.Generator().manual_seed(i + 1)
        delta = {name: (c + 0.5 * torch.randn(c.shape, generator=generator)) * 1e-3 for name, c in common.items()}
        payload = codec.encode(delta, {})
        peer = generate_identity()
        header = UpdateHeader(
            run_id=cfg.run_name,
            config_hash=cfg.config_hash,
            round=server.current.index,
            base_version=server.master.version,
            peer_public_key=peer.public_key,
            tokens=cfg.local_steps * cfg.inner.batch_size * 64,
            inner_steps=cfg.local_steps,
            codec=codec.name,
            payload_bytes=len(payload),
            payload_sha256=payload_digest(payload),
            nonce=new_nonce(),
            timestamp_s=time.time(),
        )
        made.append((sign_update(header, peer), payload))
    return made


def _submit(server: AggregatorServer, update: Any, payload: bytes) -> None:
    envelope = update.to_bytes()
    upload = Upload(update=SignedUpdate.from_bytes(envelope), envelope=envelope, payload=payload)
    decision = server.keeper.submit(upload)
    assert decision.accepted, f"a generated update was refused: {decision.rejection}"


async def measure(
    size: str, density: float, distinct: int, peers: list[int], *, held_out: bool = True, shards: int = 1
) -> dict[str, Any]:
    """Arrival rate over `distinct` updates, then the close of a round of each size in `peers`.

    With `shards` > 1 this is shard 0's aggregator, which cannot run the held-out check (it holds part of
    the model): compare it with one shard's run with the check off.
    """
    held_out = held_out and shards == 1
    result: dict[str, Any] = {"size": size, "density": density, "distinct": distinct, "held_out": held_out}
    result |= {"shards": shards, "closes": []}
    with tempfile.TemporaryDirectory(prefix="potluck-ingest-") as tmp:
        server = _server(size, density, Path(tmp) / "arrival", shards=shards)
        result["num_params"] = sum(t.numel() for t in server.master.params.values())
        updates = _updates(server, distinct)
        started = time.perf_counter()
        for update, payload in updates:
            _submit(server, update, payload)
        arrival_s = time.perf_counter() - started
        accepted = list(server.current.accepted.values())
        assert len(accepted) == distinct, f"{distinct - len(accepted)} of the generated updates were refused"
        payload_bytes = sum(len(p) for _, p in updates)
        result |= {
            "payload_bytes": payload_bytes // distinct,
            "updates_per_s": distinct / arrival_s,
            "payload_mb_per_s": payload_bytes / arrival_s / 1e6,
        }
        server.ledger.close()
        for n in peers:
            server = _server(size, density, Path(tmp) / f"close-{n}", held_out=held_out, shards=shards)
            for i in range(n):
                template = accepted[i % distinct]
                peer = generate_identity()
                header = dataclasses.replace(
                    template.update.header, peer_public_key=peer.public_key, nonce=new_nonce()
                )
                server.current.accepted[peer.public_key] = Accepted(
                    update=sign_update(header, peer),
                    envelope=template.envelope,
                    payload=template.payload,
                    decoded=template.decoded,
                    weight=template.weight,
                )
            started = time.perf_counter()
            await server.close("all-reported")
            close_s = time.perf_counter() - started
            assert server.rounds_closed == 1, "the round did not close"
            closed = server.keeper.closed.get(0)
            assert closed is not None
            kept = len(closed.credited)  # random updates may fail the held-out check: it still ran on them
            round_s = n / result["updates_per_s"] + close_s
            result["closes"].append({"peers": n, "kept": kept, "close_s": close_s, "round_s": round_s})
            server.ledger.close()
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10m", help="Model sizes, comma-separated (potluck's MODEL_SIZES).")
    parser.add_argument("--densities", default="0.015625,0.5", help="Upload top-k densities, comma-separated.")
    parser.add_argument("--distinct", type=int, default=8, help="Distinct updates encoded and submitted.")
    parser.add_argument("--peers", default="16,64,256", help="Round sizes whose close is timed, comma-separated.")
    parser.add_argument(
        "--no-held-out", action="store_true", help="Close rounds without the held-out check (held_out_margin none)."
    )
    parser.add_argument("--shards", default="1", help="Shard counts, comma-separated: time shard 0's aggregator.")
    parser.add_argument("--out", type=Path, help="Write PREFIX.json and PREFIX.md.")
    args = parser.parse_args()
    runs = []
    for size in args.sizes.split(","):
        for density in (float(d) for d in args.densities.split(",")):
            for shards in (int(s) for s in args.shards.split(",")):
                peers = [int(n) for n in args.peers.split(",")]
                run = asyncio.run(
                    measure(size, density, args.distinct, peers, held_out=not args.no_held_out, shards=shards)
                )
                print(json.dumps(run), flush=True)
                runs.append(run)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}"
    lines = [
        f"Machine: {machine}.",
        "",
        "| model | shards | params (shard 0) | density | held-out check | payload | arrival updates/s | payload MB/s "
        "| peers | close s | round s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for c in r["closes"]:
            lines.append(
                f"| {r['size']} | {r.get('shards', 1)} | {r['num_params'] / 1e6:.1f}M | 1/{round(1 / r['density'])} | "
                f"{'on' if r['held_out'] else 'off'} | "
                f"{r['payload_bytes'] / 1e3:,.0f} kB | {r['updates_per_s']:.1f} | {r['payload_mb_per_s']:.1f} | "
                f"{c['peers']} | {c['close_s']:.1f} | {c['round_s']:.1f} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
