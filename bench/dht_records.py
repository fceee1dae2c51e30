"""How big a holder lookup is at N holders: one key for the whole run (v1) against bucketed keys (v2).

Issue 24, point 3. Real hivemind DHT nodes (each with its own p2pd) on loopback; N holder identities,
each with its own Ed25519 key, spread over the storing nodes (one node signs for many keys, as the red
team's stranger does), store a signed holder record of shard 0 at one version:

- `v1`: every record under one key, one subkey per holder, as the peers stored them before issue 24
  (`potluck/v1/state-holders`; the bench adds the setting to the key so that settings do not mix);
- `v2`: the records where protocol/holder_records.py puts them now (bucket keys by config, shard,
  version; holder_buckets(N) buckets, N being the round's contributors).

A reader in client mode (it stores nothing, so every answer comes over the wire) then looks the holders
up as a joiner does (v2: holder_records.lookup_keys, READ_BUCKETS buckets) `--lookups` times. Per lookup:
`entries` (subkeys the DHT returned, summed over the keys read), `parsed` (records the reader verified:
v1 every one, v2 only the members', the freshest MAX_PARSED_PER_BUCKET a bucket), `wire_bytes` (the serialized find
responses the reader received, every replica's answer counted) and `value_bytes` (subkeys and values
of the merged result). With `--flood S`, S stranger keys also write into the buckets the reader will
read (a seeded reader: the worst case) before it looks. `store_wire_bytes`: the find responses a store's
own lookup of the key's nearest nodes received, per record stored (hivemind's find answers carry the value).

    nice -n 19 python bench/dht_records.py --holders 10,100,1000 --dht-nodes 12 --lookups 5 \
        --out bench/results/dht-records.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402

from potluck.lab.attackers.dht_records import ManyKeysValidator  # noqa: E402
from potluck.protocol.holder_records import (  # noqa: E402
    HolderRecord,
    holder_buckets,
    lookup_keys,
    parse_holder_records,
    sign_holder_record,
    store_holder_record,
)
from potluck.protocol.identity import Identity, generate_identity  # noqa: E402
from potluck.protocol.node import Node, start_node  # noqa: E402

V1_KEY = "potluck/v1/state-holders"
TTL_S = 900.0
# per storing node: hundreds of stores in flight on 2 cores only queue, past store_holder_record's 10 s limit
STORES_AT_ONCE = 4


class WireCounter:
    """Counts the find responses a node receives: how many, and their serialized bytes."""

    def __init__(self, node: Node) -> None:
        self.calls = 0
        self.bytes = 0
        protocol = node.dht.protocol
        get_stub = protocol.get_stub

        counter = self

        class CountingStub:
            """hivemind's stub, with its find responses counted (its wrapper routes every rpc_* to the inner stub)."""

            def __init__(self, stub: Any) -> None:
                self._stub = stub

            def __getattr__(self, name: str) -> Any:
                return getattr(self._stub, name)

            async def rpc_find(self, request: Any, timeout: float | None = None) -> Any:
                response = await self._stub.rpc_find(request, timeout=timeout)
                counter.calls += 1
                counter.bytes += response.ByteSize()
                return response

        protocol.get_stub = lambda peer: CountingStub(get_stub(peer))

    def reset(self) -> None:
        """Start counting afresh (one lookup)."""
        self.calls = self.bytes = 0


def _record(identity: Identity, *, config_hash: str, version: int, node: Node) -> HolderRecord:
    return HolderRecord(
        holder=identity.public_key,
        libp2p_peer_id=node.p2p.peer_id.to_bytes(),
        maddrs=(f"/ip4/127.0.0.1/tcp/4{len(config_hash)}/p2p/{node.p2p.peer_id}",),
        config_hash=config_hash,
        shards=((0, version),),
        timestamp_s=time.time(),
    )


async def _store_all(
    stores: Sequence[Node], owners: Sequence[Identity], layout: str, *, config_hash: str, version: int, n: int
) -> int:
    """Every owner stores its record (owner i on storing node i mod len(stores)); how many stores succeeded."""

    async def one_node(index: int, node: Node) -> int:
        mine = owners[index :: len(stores)]
        done = 0
        for start in range(0, len(mine), STORES_AT_ONCE):
            batch = mine[start : start + STORES_AT_ONCE]
            results = await asyncio.gather(*(_store_one(node, i, layout, config_hash, version, n) for i in batch))
            done += sum(results)
        return done

    counts = await asyncio.gather(*(one_node(i, node) for i, node in enumerate(stores)))
    return sum(counts)


async def _store_one(node: Node, identity: Identity, layout: str, config_hash: str, version: int, n: int) -> bool:
    from hivemind.utils import get_dht_time

    record = _record(identity, config_hash=config_hash, version=version, node=node)
    if layout == "v1":
        subkey, value = sign_holder_record(record, identity)
        key = f"{V1_KEY}#bench-{n}"
        return bool(await node.dht.store(key, value, get_dht_time() + TTL_S, subkey=subkey))
    return await store_holder_record(node.dht, record, identity, ttl_s=TTL_S, contributors={0: n})


async def _flood(
    stores: Sequence[Node], strangers: Sequence[Identity], keys: Sequence[str], *, config_hash: str
) -> int:
    """Strangers' signed records of the same shard and version into `keys` (the buckets the reader reads)."""
    from hivemind.utils import get_dht_time

    async def one(index: int, identity: Identity) -> bool:
        node = stores[index % len(stores)]
        record = _record(identity, config_hash=config_hash, version=1, node=node)
        subkey, value = sign_holder_record(record, identity)
        results = [await node.dht.store(k, value, get_dht_time() + TTL_S, subkey=subkey) for k in keys]
        return all(results)

    stored = 0
    for start in range(0, len(strangers), STORES_AT_ONCE * len(stores)):
        batch = list(enumerate(strangers))[start : start + STORES_AT_ONCE * len(stores)]
        stored += sum(await asyncio.gather(*(one(i, s) for i, s in batch)))
    return stored


def _entries(result: Any) -> dict[Any, Any]:
    value = getattr(result, "value", None)
    return value if isinstance(value, dict) else {}


def _value_bytes(entries: dict[Any, Any]) -> int:
    packed = [[k, getattr(v, "value", b""), getattr(v, "expiration_time", 0.0)] for k, v in entries.items()]
    return len(msgpack.packb(packed, use_bin_type=True))


async def _lookup(
    reader: Node, counter: WireCounter, layout: str, *, n: int, config_hash: str, members: frozenset[bytes], seed: int
) -> dict[str, Any]:
    """One lookup as a joiner makes it: what came over the wire, what was returned, what was parsed."""
    if layout == "v1":
        keys = [f"{V1_KEY}#bench-{n}"]
    else:
        keys = lookup_keys(config_hash, shard=0, version=1, contributors=n, rng=random.Random(seed))
    counter.reset()
    started = time.perf_counter()
    found = await reader.dht.get_many(keys, sufficient_expiration_time=float("inf"))
    took_s = time.perf_counter() - started
    entries = sum(len(_entries(found.get(k))) for k in keys)
    parse_started = time.perf_counter()
    # v1's reader checked every record under the key; v2's checks at most MAX_PARSED_PER_BUCKET members' a bucket
    limit = {"limit": entries} if layout == "v1" else {}
    parsed = [
        r for k in keys for r in parse_holder_records(found.get(k), config_hash=config_hash, trusted=members, **limit)
    ]
    return {
        "keys": len(keys),
        "entries": entries,
        "parsed": len(parsed),
        "found": len({r.holder for r in parsed}),
        "value_bytes": sum(_value_bytes(_entries(found.get(k))) for k in keys),
        "wire_bytes": counter.bytes,
        "find_calls": counter.calls,
        "lookup_s": round(took_s, 3),
        "parse_s": round(time.perf_counter() - parse_started, 4),
    }


def _summary(lookups: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("entries", "parsed", "found", "value_bytes", "wire_bytes", "find_calls", "lookup_s"):
        values = [lookup[field] for lookup in lookups]
        out[field] = {"mean": round(statistics.fmean(values), 1), "max": max(values)}
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the DHT, store and look up every setting, stop everything; the results."""
    settings = [int(n) for n in args.holders.split(",")]
    owners = [generate_identity() for _ in range(max(settings))]
    strangers = [generate_identity() for _ in range(args.flood)]
    first = await start_node()
    nodes = [first]
    results: list[dict[str, Any]] = []
    try:
        join = [str(m) for m in await first.p2p.get_visible_maddrs()]
        nodes += await asyncio.gather(*(start_node(initial_peers=join) for _ in range(args.dht_nodes - 1)))
        for node in nodes:
            node.dht.protocol.record_validator = ManyKeysValidator([*owners, *strangers])
        reader = await start_node(initial_peers=join, client_mode=True)
        nodes.append(reader)
        counter = WireCounter(reader)
        store_counters = [WireCounter(node) for node in nodes[:-1]]
        for n in settings:
            for layout in args.layouts.split(","):
                config_hash = f"{n:064x}"  # a run config of its own per setting: no record of one is seen in another
                for c in store_counters:
                    c.reset()
                started = time.perf_counter()
                stored = await _store_all(nodes[:-1], owners[:n], layout, config_hash=config_hash, version=1, n=n)
                store_s = time.perf_counter() - started
                # a store first finds the key's nearest nodes, and every find answer carries the key's value
                store_wire_bytes = sum(c.bytes for c in store_counters) / max(1, stored)
                flooded = 0
                if args.flood and layout == "v2" and n == max(settings):
                    keys = lookup_keys(config_hash, shard=0, version=1, contributors=n, rng=random.Random(0))
                    flooded = await _flood(nodes[:-1], strangers, keys, config_hash=config_hash)
                members = frozenset(o.public_key for o in owners[:n])
                lookups = [
                    await _lookup(
                        reader,
                        counter,
                        layout,
                        n=n,
                        config_hash=config_hash,
                        members=members,
                        seed=0 if flooded else s,
                    )
                    for s in range(args.lookups)
                ]
                row = {
                    "layout": layout,
                    "holders": n,
                    "buckets": 1 if layout == "v1" else holder_buckets(n),
                    "stored": stored,
                    "store_s": round(store_s, 1),
                    "store_wire_bytes": round(store_wire_bytes),
                    "flood": flooded,
                    **_summary(lookups),
                }
                print(json.dumps(row, separators=(",", ":")), flush=True)
                results.append(row)
    finally:
        await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)
    return {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": args.note},
        "dht_nodes": args.dht_nodes,
        "lookups": args.lookups,
        "results": results,
    }


def main() -> None:
    """`python bench/dht_records.py --holders 10,100,1000 --dht-nodes 12 --out FILE`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holders", default="10,100,1000", help="comma-separated holder counts")
    parser.add_argument("--dht-nodes", type=int, default=12, help="storing DHT nodes (the reader comes on top)")
    parser.add_argument("--layouts", default="v1,v2", help="v1 (one key for the run), v2 (bucketed), or both")
    parser.add_argument("--lookups", type=int, default=5, help="lookups per setting")
    parser.add_argument("--flood", type=int, default=0, help="stranger keys flooding the read buckets (largest N)")
    parser.add_argument("--note", default="2 cores, shared and loaded (the integrator's benchmarks run meanwhile)")
    parser.add_argument("--out", type=Path, help="write the results here as compact JSON")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
