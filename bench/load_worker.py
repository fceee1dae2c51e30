"""One worker of the load generator (bench/load.py starts a few): many volunteer identities on a few libp2p nodes.

Each identity has its own Ed25519 key and does with the aggregator what a volunteer's peer does, minus the
training: it joins (asks for the manifest under its key, as `Sync` does; a fraction also download the state's
chunks through `fetch_chunks`, the peer's own download), then round after round it submits a real signed update
(the run's codec at the round's announced density), long-polls the round's aggregate and fetches its final
receipt, all through `AggregatorLink`, the peer's client. Calls that get no answer or a BUSY are retried with the
peer's backoff; every refusal is counted by its code.

The payload is encoded once per density from one pseudo-gradient; each identity's copy differs in a few value
codes (the aggregator refuses a payload another key already sent in the same round, and a real round's
payloads all differ), so every update decodes, passes the round's checks and is aggregated like an honest one.
Each round's update is signed anew by its identity (round, version, nonce, timestamp).

Identities share the worker's nodes, `per_node` to each: a node is one libp2p peer id to the aggregator, which
answers a peer id's streams beyond its caps (handlers.py) with BUSY. A node therefore keeps its streams of each
kind within those caps (one semaphore per kind), as volunteers behind one peer id would have to, so the BUSY
refusals counted are the aggregator's totals, not the sharing. With more identities on a node than its
long-poll cap, the rest ask for the aggregate once the round has closed.

Prints JSON lines: `ready` (nodes up, identities joined), one `round` line per round, `done`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import random
import re
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from hivemind.utils.multiaddr import Multiaddr

from potluck.aggregator_server.handlers import (
    LONG_POLLS_PER_PEER,
    RECEIPT_REQUESTS_PER_PEER,
    STATE_REQUESTS_PER_PEER,
    UPLOADS_PER_PEER,
)
from potluck.aggregator_server.master import token_cap
from potluck.peer.state_download import Donor, fetch_chunks
from potluck.peer.sync import RETRY_BASE_S, RETRY_CAP_S, _chunk_request
from potluck.protocol.backoff import backoff_s
from potluck.protocol.chunk_server import AGGREGATOR_CHUNK_STREAMS_PER_PEER
from potluck.protocol.client import AggregatorLink, AggregatorRefused, AggregatorUnreachable
from potluck.protocol.codecs.base import _split as split_payload
from potluck.protocol.config import RunConfig
from potluck.protocol.density import round_codecs
from potluck.protocol.envelope import StateHeader, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity, generate_identity
from potluck.protocol.messages import config_in_head
from potluck.protocol.node import create_p2p, dial, parse_join_address, peer_id_of
from potluck.protocol.shards import shard_names
from potluck.protocol.state_chunks import check_manifest
from potluck.protocol.wire import RefusalCode
from potluck.tasks import run_shapes

T = TypeVar("T")
logger = logging.getLogger("bench.load_worker")


def varied_payloads(payload: bytes) -> Callable[[int], bytes]:
    """`payload` made distinct per identity: identity i's copy has i XORed into the first 3 bytes of its value codes.

    A codec payload is a prefix, a msgpack header and a safetensors body (codecs/base.py); the body's `codes`
    array holds the quantized values, every byte of which decodes (2, 4 or 8-bit codes), so the copies differ
    by a few quantization steps in a few values and decode like the original.
    """
    _, body = split_payload(payload)
    body_at = len(payload) - len(body)
    (header_bytes,) = struct.unpack_from("<Q", body)
    arrays = json.loads(body[8 : 8 + header_bytes])
    if "codes" not in arrays:
        raise SystemExit("the run's upload codec has no `codes` array: the load generator cannot vary its payload")
    start, end = arrays["codes"]["data_offsets"]
    at = body_at + 8 + header_bytes + start
    if end - start < 3:
        raise SystemExit("the payload's value codes are under 3 bytes: too small to tell 2**24 identities apart")

    def payload_of(index: int) -> bytes:
        mixed = bytes(a ^ b for a, b in zip(payload[at : at + 3], index.to_bytes(3, "big"), strict=True))
        return payload[:at] + mixed + payload[at + 3 :]

    return payload_of


class Payloads:
    """The update payload at each density the run announces, encoded once from one pseudo-gradient."""

    def __init__(self, cfg: RunConfig, seed: int, *, shard: int = 0) -> None:
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)
        shapes = run_shapes(cfg)
        owned = shard_names(shapes, cfg.shards)[shard]  # a shard's aggregator takes its own tensors only
        # honest peers agree on a direction: one shared random direction, small like a real round's update
        self.delta = {name: torch.randn(shapes[name], generator=generator) * 1e-3 for name in owned}
        self._by_density: dict[float, tuple[str, Callable[[int], bytes]]] = {}

    def at(self, density: float) -> tuple[str, Callable[[int], bytes]]:
        """The codec name and the per-identity payloads at upload `density`."""
        if density not in self._by_density:
            codec, _ = round_codecs(self.cfg, density)
            self._by_density[density] = (codec.name, varied_payloads(codec.encode(self.delta, {})))
        return self._by_density[density]


@dataclass(kw_only=True, slots=True)
class Node:
    """One libp2p node of the worker, its link to the aggregator, and its streams of each kind in flight."""

    link: AggregatorLink
    uploads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(UPLOADS_PER_PEER))
    polls: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LONG_POLLS_PER_PEER))
    receipts: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(RECEIPT_REQUESTS_PER_PEER))
    states: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(STATE_REQUESTS_PER_PEER))
    downloads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))  # chunk streams: 2 of 4


@dataclass(kw_only=True, slots=True)
class Position:
    """Where an identity stands: the open round it trains for, the state version and the round's density."""

    round: int
    version: int
    density: float


def _refusal_key(stage: str, e: AggregatorUnreachable) -> str:
    """`stage:CODE`, and for a failure without a code (a stream that ended or timed out) its cause, digits as N."""
    if e.code is not RefusalCode.UNSPECIFIED:
        return f"{stage}:{e.code.name}"
    cause = re.sub(r"[0-9]+", "N", str(e).split(": ", 1)[-1])[:48]
    return f"{stage}:{e.code.name}:{cause}"


@dataclass(kw_only=True, slots=True)
class Tally:
    """One round's outcomes over this worker's identities."""

    submit_s: list[float] = field(default_factory=list)  # first try to signed receipt, per identity
    poll_s: list[float] = field(default_factory=list)  # receipt to aggregate, per identity
    receipt_s: list[float] = field(default_factory=list)
    accepted: int = 0  # receipts on arrival that accepted the update
    credited: int = 0  # final receipts that credited it
    refused: Counter[str] = field(default_factory=Counter)  # refusal codes and receipt reasons, by stage
    bytes_up: int = 0

    def line(self, round_index: int, worker: int) -> dict[str, Any]:
        """The JSON line this round's tally is reported as."""
        return {
            "event": "round",
            "worker": worker,
            "round": round_index,
            "submit_s": [round(s, 4) for s in self.submit_s],
            "poll_s": [round(s, 4) for s in self.poll_s],
            "receipt_s": [round(s, 4) for s in self.receipt_s],
            "accepted": self.accepted,
            "credited": self.credited,
            "refused": dict(self.refused),
            "bytes_up": self.bytes_up,
        }


class Worker:
    """This process's identities and nodes; `run` joins them, then plays `rounds` rounds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.identities = [generate_identity() for _ in range(args.count)]
        self.cfg = RunConfig()  # the run's own, once `learn_config` has read it from the state
        self.payloads: Payloads | None = None
        self.tokens = 0
        self.nodes: list[Node] = []
        self.rng = random.Random(args.seed + args.first)
        self.join_refused: Counter[str] = Counter()

    def node_of(self, i: int) -> Node:
        """The node identity `i` (of this worker) uses."""
        return self.nodes[i // self.args.per_node]

    async def retrying(self, stage: str, tally: Counter[str], call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """`call()` until it answers, as the peer's `Sync.retrying` does: backoff after no answer or BUSY.

        Every refusal is counted under `stage:CODE`; a refusal that is not BUSY ends the retries (raised).
        """
        attempt = 0
        while True:
            try:
                return await call()
            except AggregatorUnreachable as e:
                tally[_refusal_key(stage, e)] += 1
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(backoff_s(attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S))
                attempt += 1
            except AggregatorRefused as e:
                tally[f"{stage}:{e.code.name}"] += 1
                raise

    async def join(self, i: int, *, download: bool) -> Position:
        """Identity `i` asks for the manifest under its key (and, `download`, the state's chunks): where it stands."""
        node, key = self.node_of(i), self.identities[i].public_key
        deadline = time.monotonic() + self.args.timeout

        async def manifest() -> tuple[StateHeader, list[bytes]]:
            async with node.states:
                signed, digest_bytes, _ = await node.link.fetch_manifest(key)
            return signed.header, check_manifest(signed.header, digest_bytes)

        h, digests = await self.retrying("join", self.join_refused, manifest, deadline)
        if download:
            async with node.downloads:
                await self.download(node, h, digests)
        return Position(round=h.round, version=h.new_version, density=h.density)

    async def learn_config(self) -> None:
        """The run's config, from the first chunk of the state the aggregator serves (as a joining peer reads it)."""
        node, key = self.nodes[0], self.identities[0].public_key
        signed, digest_bytes, _ = await node.link.fetch_manifest(key)
        h = signed.header
        chunk, _ = await node.link.fetch_chunk(_chunk_request(h, 0))
        if hashlib.sha256(chunk).digest() != check_manifest(h, digest_bytes)[0]:
            raise SystemExit("the state's first chunk does not match its manifest")
        cfg = config_in_head(chunk)
        if cfg is None or cfg.config_hash != h.config_hash:
            raise SystemExit("the state's first chunk does not carry the run's config")
        self.cfg, self.tokens = cfg, token_cap(cfg)
        self.payloads = Payloads(cfg, seed=self.args.seed, shard=h.shard)

    async def download(self, node: Node, h: StateHeader, digests: list[bytes]) -> None:
        """The state's chunks from the aggregator, as a joiner's first donor (the peer's own download code)."""

        async def fetch(index: int) -> bytes:
            chunk, _ = await node.link.fetch_chunk(_chunk_request(h, index))
            return chunk

        donor = Donor(name="aggregator", fetch=fetch, streams=AGGREGATOR_CHUNK_STREAMS_PER_PEER // 2)
        fetched = await fetch_chunks(digests, payload_bytes=h.payload_bytes, chunk_bytes=h.chunk_bytes, donors=[donor])
        if hashlib.sha256(fetched.payload).digest() != h.payload_sha256:
            raise SystemExit("the state downloaded does not match its signed header")

    async def play(self, i: int, at: Position, tally: Tally) -> Position:
        """One round of identity `i`: submit, long-poll the aggregate, fetch the final receipt; the next position."""
        identity, node = self.identities[i], self.node_of(i)
        deadline = time.monotonic() + 2 * self.cfg.round_deadline_s + 60
        if self.args.spread > 0:
            await asyncio.sleep(self.rng.uniform(0, self.args.spread))
        assert self.payloads is not None  # learn_config came first
        codec, payload_of = self.payloads.at(at.density)
        payload = payload_of(self.args.first + i)
        update = sign_update(self.header(identity, at, codec, payload), identity)
        started = time.monotonic()

        async def submit() -> Any:
            async with node.uploads:
                return await node.link.submit(update, payload)

        try:
            signed, transfer = await self.retrying("submit", tally.refused, submit, deadline)
        except (AggregatorUnreachable, AggregatorRefused):
            return await self.join(i, download=False)
        got = time.monotonic()
        tally.submit_s.append(got - started)
        tally.bytes_up += transfer.sent_bytes
        receipt = signed.receipt
        if receipt.accepted:
            tally.accepted += 1
        else:
            tally.refused[f"receipt:{receipt.reason.split(':', 1)[0]}"] += 1

        async def poll() -> Any:
            async with node.polls:
                return await node.link.fetch_aggregate(at.round, timeout_s=2 * self.cfg.round_deadline_s + 60)

        try:
            aggregate, _, _ = await self.retrying("aggregate", tally.refused, poll, deadline)
        except (AggregatorUnreachable, AggregatorRefused):
            return await self.join(i, download=False)  # as a peer that missed the aggregate: the state again
        tally.poll_s.append(time.monotonic() - got)
        h = aggregate.header
        if receipt.accepted and receipt.round == at.round and identity.public_key in dict(h.contributors):
            await self.final_receipt(node, at.round, update.header.digest(), tally)
        return Position(round=h.round + 1, version=h.new_version, density=h.next_density or at.density)

    async def final_receipt(self, node: Node, round_index: int, digest: bytes, tally: Tally) -> None:
        """The closed round's final receipt of one update, as the peer collects it (not kept)."""
        started = time.monotonic()

        async def fetch() -> Any:
            async with node.receipts:
                return await node.link.fetch_receipt(round_index, digest)

        try:
            signed, _ = await self.retrying("receipt", tally.refused, fetch, started + 60)
        except (AggregatorUnreachable, AggregatorRefused):
            return
        tally.receipt_s.append(time.monotonic() - started)
        tally.credited += signed.receipt.accepted

    def header(self, identity: Identity, at: Position, codec: str, payload: bytes) -> UpdateHeader:
        """The update header identity signs for the round at `at` (tokens: the run's cap, a full round's work)."""
        return UpdateHeader(
            run_id=self.cfg.run_name,
            config_hash=self.cfg.config_hash,
            round=at.round,
            base_version=at.version,
            peer_public_key=identity.public_key,
            tokens=self.tokens,
            inner_steps=self.cfg.local_steps,
            codec=codec,
            payload_bytes=len(payload),
            payload_sha256=payload_digest(payload),
            nonce=new_nonce(),
            timestamp_s=time.time(),
        )

    async def run(self) -> None:
        """Start the nodes, join every identity, wait for the go file, play the rounds, stop the nodes."""
        args = self.args
        maddr = parse_join_address(args.join)
        target = peer_id_of(maddr)
        address = Multiaddr(args.join.rsplit("/p2p/", 1)[0])  # p2pd dials the address without its /p2p/ part
        started = time.monotonic()
        p2ps = []
        try:
            for _ in range(-(-len(self.identities) // args.per_node)):
                p2p = await create_p2p(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=60)  # a loaded box
                p2ps.append(p2p)
                await dial(p2p, target, [address])
                self.nodes.append(Node(link=AggregatorLink(p2p, target)))
            nodes_s = time.monotonic() - started
            await self.learn_config()
            logger.info("%d nodes up in %.1f s; joining %d identities", len(self.nodes), nodes_s, len(self.identities))
            downloads = round(len(self.identities) * args.download_fraction)
            positions = await asyncio.gather(
                *(self.join(i, download=i < downloads) for i in range(len(self.identities)))
            )
            _say(
                event="ready",
                worker=args.worker,
                nodes=len(self.nodes),
                nodes_s=nodes_s,
                join_s=time.monotonic() - started - nodes_s,
                downloads=downloads,
                refused=dict(self.join_refused),
            )
            while not Path(args.go_file).exists():  # the launcher's barrier: every worker's identities joined
                await asyncio.sleep(0.05)
            at = list(positions)
            for _ in range(args.rounds):
                r = max(p.round for p in at)
                tally = Tally()
                at = await asyncio.gather(*(self.play(i, at[i], tally) for i in range(len(self.identities))))
                _say(**tally.line(r, args.worker))
            _say(event="done", worker=args.worker)
        finally:
            await asyncio.gather(*(p.shutdown() for p in p2ps), return_exceptions=True)


def _say(**line: Any) -> None:
    print(json.dumps(line), flush=True)


def main() -> None:
    """The worker's command line (bench/load.py renders it)."""
    parser = argparse.ArgumentParser(prog="python -m bench.load_worker", description=__doc__)
    parser.add_argument("--join", required=True, help="the aggregator's multiaddr")
    parser.add_argument("--worker", type=int, default=0, help="this worker's number (for its lines)")
    parser.add_argument("--first", type=int, default=0, help="the run-wide index of this worker's first identity")
    parser.add_argument("--count", type=int, required=True, help="identities in this worker")
    parser.add_argument("--per-node", type=int, default=4, help="identities per libp2p node")
    parser.add_argument("--download-fraction", type=float, default=0.1, help="identities that download the state")
    parser.add_argument("--rounds", type=int, required=True, help="rounds to play after the go file appears")
    parser.add_argument("--spread", type=float, default=0.0, help="each upload waits uniform [0, SPREAD] s first")
    parser.add_argument("--go-file", type=Path, required=True, help="start the rounds once this file exists")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up joining after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="the pseudo-gradient's seed (the same in every worker)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(Worker(args).run())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
