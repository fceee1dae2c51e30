"""The volunteer's main loop: join, find the run's aggregator, sync, then train / submit / apply, round after round.

DESIGN.md's "One round, as data" from the peer's side. The peer keeps the master state (parameters
and outer momentum) exactly as the aggregator does: it applies each signed aggregate with the same
outer step and compares the result's checksum with the one the aggregator signed; any difference
(or a gap it cannot fill) and it downloads the state again. It never trusts an aggregator key the
run's config does not list.

Network trouble is expected, not fatal: a call that gets no answer is retried with exponential
backoff (the aggregator may be restarting), the aggregator is looked up again on the DHT, and after
`reconnect_timeout_s` without success the peer gives up with one line.
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from potluck.errors import DIVERGED_EXIT_STATUS, PotluckError
from potluck.events import (
    DonorDropped,
    Event,
    Failover,
    Finished,
    PeerDone,
    PeerPlan,
    PeerRound,
    PeerSynced,
    ReceiptInvalid,
    ReceiptReceived,
    StateRefused,
)
from potluck.incentives.receipts import ReceiptError, check_receipt, store_receipt
from potluck.peer.state_download import Donor, DownloadFailed, Fetched, fetch_chunks
from potluck.peer.trainer import LocalTrainer, RoundSnapshot, RoundWork, TrainingDiverged
from potluck.planning.plan import auto_plan
from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.chunk_server import ChunkUnavailable, chunk_handler
from potluck.protocol.client import AggregatorLink, AggregatorRefused, AggregatorUnreachable, Transfer
from potluck.protocol.codecs import Codec
from potluck.protocol.config import RunConfig
from potluck.protocol.density import round_codecs
from potluck.protocol.dht_schema import AGGREGATORS_KEY, MAX_MADDRS, AggregatorAnnouncement, parse_announcements
from potluck.protocol.envelope import (
    EnvelopeError,
    SignedAggregate,
    SignedUpdate,
    StateHeader,
    UpdateHeader,
    new_nonce,
    payload_digest,
    sign_update,
)
from potluck.protocol.holder_records import HOLDERS_KEY, HolderRecord, parse_holder_records, store_holder_record
from potluck.protocol.identity import Identity, fingerprint, public_key_to_hex
from potluck.protocol.messages import CHUNK_HANDLER, encode_state_payload
from potluck.protocol.node import JoinError, dial, parse_join_address, peer_id_of, start_node
from potluck.protocol.probe import ProbeUnavailableError, measure_rates
from potluck.protocol.shards import keys_of_shard
from potluck.protocol.state_chunks import ChunkError, ChunkRequest, check_manifest
from potluck.protocol.wire import PeerRefusedError, RefusalCode, WireError
from potluck.training.benchmark import measure_for_plan
from potluck.training.diloco import OuterOptimizer
from potluck.training.held_out import HeldOutLoss
from potluck.training.models import model_config, parameter_shapes
from potluck.training.replica import ReplicaError, apply_aggregate, check_state

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLAN_PROBE_BYTES = 1024 * 1024  # each way: ~1 s at 10 Mbit/s, enough for a rate that means something
PLAN_PROBE_TIMEOUT_S = 30.0
FAILOVER_AFTER_S = 10.0  # a shard's aggregator silent this long: switch to its standby once one is announced
MAX_DONORS = 8  # holding peers one state download asks besides the aggregator
TIME_BOX_MARGIN = 0.1  # of the round deadline, kept free: the round opened a download before the peer saw it
# The overlap limit a peer falls back to once an update with more than this share of stale steps was dropped at
# round close: at 15 of 30 stale steps the held-out check dropped no honest update, at 30 of 30 one in nine
# (docs/experiments/overlap.md), and three drops within ten rounds ban a key.
SAFE_OVERLAP_LIMIT = 0.5


def _own_nice() -> int | None:
    """This process's nice value (None where the platform has none): a swarm's summary shows it per peer."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):
        return None


class PeerError(PotluckError):
    """The peer cannot go on (one line, with the fix)."""


class PeerDiverged(PeerError):
    """The peer's local training went non-finite: nothing it could send would be of use (one line)."""

    exit_status = DIVERGED_EXIT_STATUS


class UntrustedState(PotluckError):
    """An aggregator served a state that fails verification; the peer tries another source."""

    def __init__(self, source: bytes, detail: str) -> None:
        super().__init__(detail)
        self.source = source  # the aggregator's key: never asked again


class RunFinished(PotluckError):
    """The aggregator says the run is over: leave cleanly."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerOptions:
    """How this volunteer runs (the run itself comes from the aggregator's state)."""

    join: tuple[str, ...]
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    client_mode: bool = False
    run: str | None = None  # which run to join when the DHT carries several
    data: str | None = None  # this peer's own text (None: the run's data)
    device: torch.device = torch.device("cpu")
    batch_size: int | None = None
    max_rounds: int | None = None
    reconnect_timeout_s: float = 300.0
    join_timeout_s: float = 30.0
    receipts_dir: Path | None = None  # where final receipts are kept (None: checked, not kept)
    # Train on while an update is in flight (one-round-delayed outer updates). Off by default: at equal wall
    # time it measured within 1% but no better: +0.02% on a GPU, +0.5-0.6% on a 2-core CPU box
    # (docs/experiments/overlap.md).
    overlap: bool = False
    # With overlap, at most this share of a round's inner steps run before its base arrives; then training
    # waits for it (1: no limit). Updates whose steps were all stale fail the held-out check now and then:
    # after one such drop the peer lowers its limit to SAFE_OVERLAP_LIMIT for the rest of the run.
    overlap_limit: float = 1.0
    speed: float = 1.0  # testing aid: below 1, every inner step lasts 1/speed as long
    # At start-up, after the state: time a few inner steps, probe the link to the aggregator and log the
    # scaling efficiency the run's settings give here (potluck.planning.plan.auto_plan) for `plan_peers` peers.
    plan: bool = False
    plan_peers: int = 8
    # Score the master state on this many of the run's held-out batches after each round (0: never). An
    # aggregator scores the rounds it closes; in a sharded run none holds the whole model, so a peer may.
    eval_batches: int = 0
    # Serve chunks of the state this peer holds to joiners (state from many sources), and say so on the DHT.
    # A peer in client mode cannot be dialled, so it never serves.
    serve_state: bool = True


@dataclass(kw_only=True, slots=True)
class _Shard:
    """One shard of the run as this peer follows it: its aggregator, its tensors, its outer step and density."""

    index: int
    names: tuple[str, ...]
    announcement: AggregatorAnnouncement
    link: AggregatorLink
    version: int  # aggregates of this shard applied so far
    outer: OuterOptimizer
    density: float  # the open round's upload density (protocol/density.py)

    @property
    def key(self) -> bytes:
        return self.announcement.public_key


@dataclass(kw_only=True, slots=True)
class _Master:
    cfg: RunConfig
    round: int
    params: dict[str, torch.Tensor]  # the whole model, every shard's tensors
    shards: list[_Shard]  # one in a run that is not sharded


class PeerRunner:
    """One volunteer process; `await run()` returns when max_rounds are done or the run has finished."""

    def __init__(self, identity: Identity, options: PeerOptions, *, on_event: Callable[[Event], None]) -> None:
        self.identity = identity
        self.options = options
        self.on_event = on_event
        self.accepted = 0
        self.rejected = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.rounds_done = 0
        self.receipts = 0  # final receipts of accepted updates that verified
        self.score = 0.0  # points they credit
        self.refused_sources: set[bytes] = set()  # aggregator keys whose state did not check out
        self.abandoned: set[bytes] = set()  # aggregator keys that stopped answering and were failed over from
        self.join_addrs = [parse_join_address(a) for a in options.join]  # JoinError before anything starts
        self.trainer: LocalTrainer | None = None
        self._training: asyncio.Future[None] | None = None  # the inner steps running in their thread
        self._round_opened: float | None = None  # monotonic time the training round opened, as seen here
        self._base_arrived = threading.Event()  # cleared while overlapped steps run ahead of their round's base
        self._base_arrived.set()
        self._overlap_limit = options.overlap_limit  # lowered to SAFE_OVERLAP_LIMIT after a stale update's drop
        self._upload_s = 0.0  # the last upload's duration, which the time box keeps free
        # shard -> (round it counts in, digest) of an update accepted late
        self._late: dict[int, tuple[int, bytes]] = {}
        self._held_out: HeldOutLoss | None = None  # scores the master state (PeerOptions.eval_batches)
        self._synced_at = time.monotonic()
        self._holding: _Master | None = None  # the master state this peer serves chunks of (serve_state)
        self._held: dict[int, tuple[int, bytes, bytes]] = {}  # shard -> (version, payload, its sha256), built lazily
        self._building = asyncio.Lock()
        self.bad_donors: set[bytes] = set()  # holder keys that sent a chunk the manifest refutes
        self.chunks_served_bytes = 0

    async def run(self) -> None:
        """Join, sync and train until done; the DHT node and its daemon are shut down on every exit path."""
        node = await start_node(
            initial_peers=self.join_addrs,
            host_maddrs=self.options.host_maddrs,
            client_mode=self.options.client_mode,
            signer=self.identity,  # signs its holder record (serve_state)
            bootstrap_timeout_s=self.options.join_timeout_s,
        )
        try:
            self.node = node
            if self.serves_state:
                await node.p2p.add_binary_stream_handler(
                    CHUNK_HANDLER, chunk_handler(self._held_payload, on_served=self._chunk_served)
                )
            self.link = await self._retrying("finding the aggregator", self._find_aggregator)
            master = await self._retrying("downloading the state", self._sync_from_any)
            if self.options.plan:
                await self._start_up_plan(master.cfg)
            trainer = await asyncio.to_thread(self.make_trainer, master.cfg)
            await self._loop(master, trainer)
        except RunFinished as e:
            self.on_event(Finished(detail=str(e)))
        finally:
            await node.shutdown()
        self.on_event(self.summary())

    async def _start_up_plan(self, cfg: RunConfig) -> None:
        """Measure this machine and link for the run and report what they predict (an event, one log line)."""
        try:
            figures = await asyncio.to_thread(
                measure_for_plan, cfg, device=self.options.device, batch_size=self.options.batch_size
            )
            up, down = await measure_rates(
                self.link.p2p,
                self.link.peer_id,
                upload_bytes=PLAN_PROBE_BYTES,
                download_bytes=PLAN_PROBE_BYTES,
                timeout_s=PLAN_PROBE_TIMEOUT_S,
            )
        except (OSError, WireError, PeerRefusedError, ProbeUnavailableError, asyncio.TimeoutError) as e:
            logger.warning("start-up plan skipped: %s", e or type(e).__name__)
            return
        plan = auto_plan(
            **dataclasses.asdict(figures),
            peers=self.options.plan_peers,
            local_steps=cfg.local_steps,
            up_bits_per_s=up * 8,
            down_bits_per_s=down * 8,
        )
        self.on_event(PeerPlan(**plan.to_dict()))  # the CLI prints plan.line()

    def summary(self) -> PeerDone:
        """What this peer did, for the last status line and `potluck swarm`."""
        return PeerDone(
            fingerprint=self.identity.fingerprint,
            rounds=self.rounds_done,
            accepted=self.accepted,
            rejected=self.rejected,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            state_bytes_served=self.chunks_served_bytes,  # chunks of the state given to joiners (in bytes_up)
            receipts=self.receipts,
            score=self.score,
            **self.compute_figures(),
        )

    def compute_figures(self) -> dict[str, Any]:
        """Tokens and inner steps processed, and the share of the training span spent in inner steps.

        compute_utilization = time in inner steps / wall time from the first step's start to the last
        step's end: start-up and the wait for the run's final aggregate are not part of it.
        """
        t = self.trainer
        setup = {"overlap": self.options.overlap, "speed": self.options.speed, "nice": _own_nice()}
        if t is None or t.first_step_at is None or t.last_step_at is None:
            return {
                "tokens": 0,
                "inner_steps": 0,
                "compute_s": 0.0,
                "active_s": 0.0,
                "compute_utilization": None,
                **setup,
            }
        active_s = t.last_step_at - t.first_step_at
        return {
            "tokens": t.total_steps * t.tokens_per_step,
            "inner_steps": t.total_steps,
            "compute_s": t.total_compute_s,
            "active_s": active_s,
            "compute_utilization": min(1.0, t.total_compute_s / active_s) if active_s > 0 else 1.0,
            **setup,
        }

    # ----------------------------------------------------------------- discovery and sync

    async def _announcements(self) -> list[AggregatorAnnouncement]:
        """This run's aggregator announcements on the DHT, from sources that have not served a bad state."""
        result = await self.node.dht.get(AGGREGATORS_KEY, latest=True)
        announcements = parse_announcements(result)
        for a in announcements:
            if a.protocol_version != PROTOCOL_VERSION:
                raise PeerError(
                    f"aggregator {fingerprint(a.public_key)} speaks protocol v{a.protocol_version}, this peer speaks "
                    f"v{PROTOCOL_VERSION}; "
                    + (
                        "upgrade potluck: pip install -U potluck"
                        if a.protocol_version > PROTOCOL_VERSION
                        else "the aggregator must upgrade potluck"
                    )
                )
        if self.options.run is not None:
            announcements = [a for a in announcements if a.run_id == self.options.run]
        runs = sorted({a.run_id for a in announcements})
        if len(runs) > 1:
            raise PeerError(f"the DHT carries several runs ({', '.join(runs)}); choose one with --run NAME")
        if not announcements:
            raise AggregatorUnreachable("no aggregator announcement on the DHT yet")
        trusted = [a for a in announcements if a.public_key not in self.refused_sources]
        if not trusted:
            raise AggregatorUnreachable(
                f"every aggregator on the DHT ({len(announcements)}) served a state that does not check out"
            )
        alive = [a for a in trusted if a.public_key not in self.abandoned]  # a gone one's record lingers a while
        return alive or trusted

    async def _find_aggregator(self) -> AggregatorLink:
        """The aggregator to sync from first: the one named with --join when it is announced, else the newest."""
        announcements = await self._announcements()
        # Prefer the aggregator the user named with --join: anyone can announce a run on an open DHT.
        joined = {peer_id_of(a).to_bytes() for a in self.join_addrs}
        named = [a for a in announcements if a.libp2p_peer_id in joined]
        chosen = max(named or announcements, key=lambda a: a.timestamp_s)
        self.announcement = chosen
        peer_id = await self._connect(chosen)
        return AggregatorLink(self.node.p2p, peer_id)

    async def _connect(self, announcement: AggregatorAnnouncement) -> object:
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        peer_id = PeerID(announcement.libp2p_peer_id)
        if any(peer_id_of(a) == peer_id for a in self.join_addrs):
            maddrs = [a for a in self.join_addrs if peer_id_of(a) == peer_id]
        else:
            maddrs = [Multiaddr(m) for m in announcement.maddrs]
        await dial(self.node.p2p, peer_id, maddrs)
        return peer_id

    async def _sync_from_any(self) -> _Master:
        """The run's state from the preferred aggregator; one that serves a bad state is dropped for another.

        A state that fails verification is not a network hiccup: its source is never asked again, and
        the next announced aggregator is tried. With none left this raises AggregatorUnreachable, so the
        caller keeps looking (new aggregators may announce) until its reconnect timeout.
        """
        while True:
            if self.announcement.public_key in self.refused_sources:
                self.link = await self._find_aggregator()
            try:
                return await self._sync()
            except AggregatorUnreachable:
                # look again before the retry: a standby may have taken the shard over from a dead aggregator
                # whose announcement lingers until it expires
                with contextlib.suppress(AggregatorUnreachable):
                    self.link = await self._find_aggregator()
                raise
            except UntrustedState as e:
                source = fingerprint(e.source)
                self.refused_sources.add(e.source)
                logger.info("aggregator %s: %s; trying another source", source, e)
                self.on_event(StateRefused(aggregator=source, detail=str(e)))

    async def _sync(self) -> _Master:
        """The whole master state: from the preferred aggregator, then from each other shard's (sharded runs)."""
        before = self.bytes_down
        self._sources: list[Fetched] = []
        cfg, h, first, params = await self._fetch_shard(self.announcement, self.link)
        shards = {first.index: first}
        if cfg.shards > 1:
            announced = await self._announcements()
            for index in range(cfg.shards):
                if index in shards:
                    continue
                owners = set(keys_of_shard(cfg.aggregator_keys, index, cfg.shards))
                candidates = [a for a in announced if public_key_to_hex(a.public_key) in owners]
                if not candidates:
                    raise AggregatorUnreachable(f"no aggregator of shard {index + 1} of {cfg.shards} is announced yet")
                chosen = max(candidates, key=lambda a: a.timestamp_s)
                link = AggregatorLink(self.node.p2p, await self._connect(chosen))
                _, other, shard, part = await self._fetch_shard(chosen, link, cfg=cfg)
                if other.round != h.round:  # one shard closed its round a moment before the other
                    raise AggregatorUnreachable(
                        f"shard {index + 1} is at round {other.round}, shard {first.index + 1} at round {h.round}"
                    )
                shards[index] = shard
                params |= part
        shapes = parameter_shapes(model_config(cfg.model.size, block_size=cfg.model.block_size))
        params = {name: params[name] for name in shapes}  # the model's order: payloads depend on it
        val_loss = None
        if self.options.eval_batches > 0:
            if self._held_out is None:
                self._held_out = HeldOutLoss(cfg, batches=self.options.eval_batches)
            val_loss = await asyncio.to_thread(self._held_out, params)
        self._synced_at = time.monotonic()  # the first round's time box counts from here
        logger.info("synced run %r at round %d from %s", cfg.run_name, h.round, fingerprint(first.key))
        self.on_event(
            PeerSynced(
                run=cfg.run_name,
                round=h.round,
                aggregator=fingerprint(first.key),
                fingerprint=self.identity.fingerprint,
                state_bytes=self.bytes_down - before,
                # who gave the state's chunks (bytes per donor, the aggregator's and peers' alike)
                state_sources=_merged([f.bytes_by_donor for f in self._sources]),
                shards=cfg.shards,
                val_loss=val_loss,  # the state's held-out loss (PeerOptions.eval_batches)
            )
        )
        return _Master(
            cfg=cfg,
            round=h.round,
            params=params,
            shards=[shards[i] for i in range(cfg.shards)],
        )

    async def _fetch_shard(
        self, announcement: AggregatorAnnouncement, link: AggregatorLink, *, cfg: RunConfig | None = None
    ) -> tuple[RunConfig, StateHeader, _Shard, dict[str, torch.Tensor]]:
        """One aggregator's state, checked: its signature, its config (`cfg`'s, when given), its shard's shapes.

        The aggregator sends the signed manifest; the chunks come from it and every peer that holds the
        same shard at the same version (state_download.py).
        """
        signed, digest_bytes, t = await link.fetch_manifest(
            self.identity.public_key, client_mode=self.options.client_mode
        )
        self.bytes_down += len(t.body) + t.sent_bytes
        source = announcement.public_key
        try:
            signed.verify({source})
            digests = check_manifest(signed.header, digest_bytes)
        except (EnvelopeError, ChunkError) as e:
            raise UntrustedState(source, f"its state does not check out: {e}") from e
        fetched = await self._fetch_chunks(signed.header, digests, link)
        try:
            state = await asyncio.to_thread(check_state, signed, fetched.payload, source=source)
        except ReplicaError as e:
            raise UntrustedState(source, str(e)) from e
        if cfg is not None and state.cfg.config_hash != cfg.config_hash:
            raise UntrustedState(source, "it serves another run config than the run's other shards")
        self._sources.append(fetched)
        shard = _Shard(
            index=state.shard,
            names=tuple(state.params),
            announcement=announcement,
            link=link,
            version=state.header.new_version,
            outer=state.outer,
            density=state.header.density,
        )
        return state.cfg, state.header, shard, state.params

    async def _fetch_chunks(self, h: StateHeader, digests: list[bytes], link: AggregatorLink) -> Fetched:
        """The payload `h` signs, in chunks from its aggregator and from the peers the DHT says hold it."""

        def request(index: int) -> ChunkRequest:
            return ChunkRequest(
                shard=h.shard,
                version=h.new_version,
                payload_sha256=h.payload_sha256,
                chunk_bytes=h.chunk_bytes,
                index=index,
            )

        def donor(name: str, to: AggregatorLink, *, streams: int) -> Donor:
            async def fetch(index: int) -> bytes:
                chunk, t = await to.fetch_chunk(request(index))
                self.bytes_down += len(chunk) + t.sent_bytes
                return chunk

            return Donor(name=name, fetch=fetch, streams=streams)

        # A fast donor serves more chunks than a slow one. Two chunks in flight keep the aggregator's fat
        # link busy across each request's round trip; one per peer leaves each peer's few chunk slots
        # (MAX_CHUNK_STREAMS) to several joiners at once. The holders are looked up while the aggregator
        # already gives chunks.
        first = donor(fingerprint(h.aggregator_public_key), link, streams=2)
        names = {first.name: h.aggregator_public_key}

        async def holders() -> list[Donor]:
            records = await self._holders(h)
            links = await asyncio.gather(*(self._holder_link(r) for r in records))
            found = [(r, to) for r, to in zip(records, links, strict=True) if to is not None]
            names.update((fingerprint(r.holder), r.holder) for r, _ in found)
            return [donor(fingerprint(r.holder), to, streams=1) for r, to in found]

        try:
            fetched = await fetch_chunks(
                digests, payload_bytes=h.payload_bytes, chunk_bytes=h.chunk_bytes, donors=[first], more=holders()
            )
        except DownloadFailed as e:
            raise AggregatorUnreachable(str(e)) from e
        for name, reason in fetched.dropped.items():
            key = names[name]
            if key != h.aggregator_public_key and name in fetched.refuted:
                self.bad_donors.add(key)  # it sent a chunk the signed manifest refutes: never asked again
            self.on_event(DonorDropped(donor=name, reason=reason, shard=h.shard))
        return fetched

    async def _holders(self, h: StateHeader) -> list[HolderRecord]:
        """Peers whose DHT record says they hold shard `h.shard` at `h.new_version`, at most MAX_DONORS, shuffled."""
        try:
            result = await asyncio.wait_for(self.node.dht.get(HOLDERS_KEY, latest=True), timeout=30)
        except (TimeoutError, asyncio.TimeoutError):
            return []
        records = [
            r
            for r in parse_holder_records(result, config_hash=h.config_hash)
            if r.version_of(h.shard) == h.new_version
            and r.holder != self.identity.public_key
            and r.holder not in self.bad_donors
        ]
        random.shuffle(records)  # joiners arriving together spread over the holders
        return records[:MAX_DONORS]

    async def _holder_link(self, record: HolderRecord) -> AggregatorLink | None:
        """A link to a holding peer, dialled; None when its record's addresses do not parse."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        try:
            peer_id = PeerID(record.libp2p_peer_id)
            maddrs = [Multiaddr(m) for m in record.maddrs]
        except Exception:  # a record's contents are untrusted; hivemind raises several types on garbage
            return None
        await dial(self.node.p2p, peer_id, maddrs, timeout_s=5)
        return AggregatorLink(self.node.p2p, peer_id)

    # ----------------------------------------------------------------- serving the state to joiners

    @property
    def serves_state(self) -> bool:
        """Whether this peer serves chunks of the state it holds (PeerOptions.serve_state, not in client mode)."""
        return self.options.serve_state and not self.options.client_mode

    async def _announce_holding(self, master: _Master) -> None:
        """Say on the DHT which version of each shard this peer holds, so joiners can fetch chunks here."""
        self._holding = master
        current = {s.index: s.version for s in master.shards}
        self._held = {i: held for i, held in self._held.items() if current.get(i) == held[0]}  # free stale payloads
        if not self.serves_state:
            return
        record = HolderRecord(
            holder=self.identity.public_key,
            libp2p_peer_id=self.node.p2p.peer_id.to_bytes(),
            maddrs=tuple(str(m) for m in (await self.node.p2p.get_visible_maddrs())[:MAX_MADDRS]),
            config_hash=master.cfg.config_hash,
            shards=tuple((s.index, s.version) for s in master.shards),
            timestamp_s=time.time(),
        )
        await store_holder_record(self.node.dht, record, self.identity, ttl_s=2 * master.cfg.round_deadline_s + 60)

    async def _held_payload(self, request: ChunkRequest) -> bytes:
        """The payload of the shard and version a chunk request names, if this peer holds exactly that state.

        The payload is built on the first request for a version; a round that closes meanwhile (the
        aggregate applied while it was built) makes it stale, and the asker goes to another holder.
        """
        master = self._holding
        shard = master.shards[request.shard] if master is not None and request.shard < len(master.shards) else None
        if shard is None or shard.version != request.version:
            raise ChunkUnavailable(f"this peer does not hold shard {request.shard} at version {request.version}")
        held = self._held.get(shard.index)
        if held is None or held[0] != request.version:
            async with self._building:
                held = self._held.get(shard.index)
                if held is None or held[0] != request.version:
                    params = {name: master.params[name] for name in shard.names}
                    payload = await asyncio.to_thread(
                        encode_state_payload, master.cfg, params=params, outer_state=shard.outer.state_dict()
                    )
                    if shard.version != request.version or self._holding is not master:
                        raise ChunkUnavailable("this peer's state moved on while it was being prepared")
                    held = (request.version, payload, payload_digest(payload))
                    self._held[shard.index] = held
        if held[2] != request.payload_sha256:
            raise ChunkUnavailable(f"this peer holds another state of shard {request.shard} at that version")
        return held[1]

    def _chunk_served(self, n: int) -> None:
        self.chunks_served_bytes += n
        self.bytes_up += n

    # ----------------------------------------------------------------- rounds

    async def _loop(self, master: _Master, trainer: LocalTrainer) -> None:
        """Rounds until the run or `max_rounds` is done; with overlap, training never waits on the network.

        Round r: train (time-boxed), snapshot, encode, submit, fetch round r's aggregate, apply it.
        With overlap the next round's inner steps start right after the snapshot and run in their
        thread through the upload, the wait for the round to close and the download; the aggregate is
        then merged with `trainer.rebase`. Without it the model is reset to the new master state.
        In a sharded run each step but training happens once per shard, with the shard's aggregator.
        """
        self.trainer, self.cfg = trainer, master.cfg
        cancel = threading.Event()
        try:
            await self._rounds(master, trainer, cancel)
        finally:
            cancel.set()  # a run that ends or fails mid-round stops the training thread before the node goes
            self._base_arrived.set()  # and one waiting at the overlap limit
            if self._training is not None:
                with contextlib.suppress(Exception):
                    await self._training

    async def _rounds(self, master: _Master, trainer: LocalTrainer, cancel: threading.Event) -> None:
        cfg = master.cfg
        await asyncio.to_thread(trainer.start_round, master.params, round_index=master.round)
        self._round_opened = self._synced_at
        stale_next = 0  # the next round's steps taken before its base arrived (overlap)
        while master.round < cfg.rounds and (
            self.options.max_rounds is None or self.rounds_done < self.options.max_rounds
        ):
            await self._announce_holding(master)
            r = master.round
            stale_steps, stale_next = stale_next, 0
            codecs = [round_codecs(cfg, s.density) for s in master.shards]  # the aggregators pick each round's
            trainer.codec = codecs[0][0]  # a run of one shard's codec, for whoever reads it (the red team)
            if self._training is None:
                self._training = self._train(trainer, cfg, cancel)
            await self._training
            self._training = None
            shot = await asyncio.to_thread(trainer.take_snapshot)
            last = r + 1 >= cfg.rounds or (
                self.options.max_rounds is not None and self.rounds_done + 1 >= self.options.max_rounds
            )
            try:
                works = await asyncio.to_thread(
                    trainer.encode_shards,
                    shot,
                    round_index=r,
                    shards=[(s.names, upload) for s, (upload, _) in zip(master.shards, codecs, strict=True)],
                )
            except TrainingDiverged as e:
                raise PeerDiverged(str(e)) from None
            work = works[0]  # the round's tokens, steps and losses, the same in every shard's
            point: Mapping[str, torch.Tensor] = shot.current  # where the next round's steps start from
            if self.options.overlap and not last:
                # The next round's steps run from the guess while this round's update and aggregate are in flight.
                point = await asyncio.to_thread(self._train_from_guess, trainer, master, works, codecs, shot)
                self._round_opened = None  # the next round opens when this one's aggregate arrives
                self._base_arrived.clear()
                self._training = self._train(trainer, cfg, cancel)
            signed_updates = [await asyncio.to_thread(self.make_update, master, w, trainer) for w in works]
            submitted = await asyncio.gather(
                *(
                    self._retrying("submitting", functools.partial(_on_link, s, AggregatorLink.submit, u, p), shard=s)
                    for s, (u, p) in zip(master.shards, signed_updates, strict=True)
                )
            )
            self._upload_s = max(up.wait_s + up.transfer_s for _, up in submitted)
            for _, up in submitted:
                self.bytes_up += up.sent_bytes
                self.bytes_down += len(up.body)
            await self.after_submit()
            reasons = []
            for s, (_, payload), (receipt, _) in zip(master.shards, signed_updates, submitted, strict=True):
                try:
                    receipt.verify(s.key)
                except EnvelopeError as e:
                    raise PeerError(f"the aggregator's receipt does not verify: {e}") from e
                if not receipt.receipt.accepted:  # the arrival checks; the round-close checks come later
                    reasons.append(receipt.receipt.reason)
                    logger.warning("round %d: update rejected: %s", r, receipt.receipt.reason)
                    await asyncio.to_thread(trainer.take_back, payload, codec=codecs[s.index][0], names=s.names)
            try:
                fetched = await asyncio.gather(
                    *(
                        self._aggregate_of(s, r, u, p, timeout_s=2 * cfg.round_deadline_s + 60)
                        for s, (u, p) in zip(master.shards, signed_updates, strict=True)
                    )
                )
            except AggregatorRefused as e:
                logger.warning("round %d: %s; downloading the state again", r, e)
                master = await self._resync(trainer, cancel)
                continue
            for _, _, down in fetched:
                self.bytes_down += down.sent_bytes + len(down.body)
            # The signed contributor list is the final word: an update can pass on arrival and still be
            # dropped by the round's statistical checks.
            late_points: list[float | None] = []
            counted = []
            for s, (update, _), (receipt, _), (signed, _, _) in zip(
                master.shards, signed_updates, submitted, fetched, strict=True
            ):
                late_points.append(await self._settle_late(r, s, signed))  # an earlier late update it took in
                received = receipt.receipt.accepted
                counted_in = receipt.receipt.round  # a late update is accepted into the open round (late_updates)
                if received and counted_in > r:
                    self._late[s.index] = (counted_in, update.header.digest())
                counted.append((received, counted_in, self.identity.public_key in dict(signed.header.contributors)))
            accepted = all(received and in_list and counted_in == r for received, counted_in, in_list in counted)
            late = any(received and counted_in > r for received, counted_in, _ in counted)
            reason = "; ".join(dict.fromkeys(reasons))
            if late:
                reason = f"late: it counts in round {r + 1} at the run's discount"
                logger.warning("round %d: update %s", r, reason)
            else:
                if not reasons and not accepted:
                    reason = "dropped at round close by the round's checks (see the aggregator's log)"
                    logger.warning("round %d: update %s", r, reason)
                    self._after_drop(r, stale_steps=stale_steps, inner_steps=work.inner_steps)
                self.accepted += accepted
                self.rejected += not accepted
            pairs = zip(master.shards, fetched, strict=True)
            if not all(self._apply(master, s, signed, body) for s, (signed, body, _) in pairs):
                master = await self._resync(trainer, cancel)
            else:
                master.round = r + 1
                if self._training is not None:
                    stale_next = await asyncio.to_thread(trainer.rebase, master.params, point=point)
                    self._base_arrived.set()
                else:
                    await asyncio.to_thread(trainer.start_round, master.params, round_index=master.round)
            # The next round opened when this one closed, which the aggregate's signed timestamp says; a peer
            # that fetched it late is that much further into the next round's deadline.
            closed_s = max(signed.header.timestamp_s for signed, _, _ in fetched)
            late_s = min(max(time.time() - closed_s, 0.0), cfg.round_deadline_s)
            self._round_opened = time.monotonic() - late_s
            points: float | None = _total(late_points)
            receipt_bytes, receipt_s = 0, 0.0
            collected: list[float | None] = []
            for s, (update, _), (received, counted_in, _), (signed, _, _) in zip(
                master.shards, signed_updates, counted, fetched, strict=True
            ):
                if received and counted_in == r:
                    got, nbytes, took = await self._collect_receipt(s, r, update.header.digest(), signed)
                    collected.append(got)
                    receipt_bytes, receipt_s = receipt_bytes + nbytes, receipt_s + took
            if collected:
                points = _total([points, *collected]) if None not in collected else None
            val_loss = None
            if self.options.eval_batches > 0:
                if self._held_out is None:
                    self._held_out = HeldOutLoss(cfg, batches=self.options.eval_batches)
                val_loss = await asyncio.to_thread(self._held_out, master.params)
            self.rounds_done += 1
            self.on_event(
                PeerRound(
                    round=r,
                    loss=work.mean_loss,
                    val_loss=val_loss,
                    tokens=work.tokens,
                    inner_steps=work.inner_steps,
                    stale_steps=stale_steps,
                    tokens_per_s=work.tokens / work.compute_s if work.compute_s > 0 else 0.0,
                    accepted=accepted,
                    reason=reason,
                    update=signed_updates[0][0].header.digest().hex()[:16],
                    bytes_up=sum(up.sent_bytes for _, up in submitted),
                    state_bytes_served=self.chunks_served_bytes,
                    bytes_down=sum(down.sent_bytes + len(down.body) for _, _, down in fetched)
                    + sum(len(up.body) for _, up in submitted)
                    + receipt_bytes,
                    compute_s=work.compute_s,
                    encode_s=sum(w.encode_s for w in works),
                    upload_s=self._upload_s,
                    wait_s=max(down.wait_s for _, _, down in fetched),
                    download_s=max(down.transfer_s for _, _, down in fetched),
                    points=points,
                    receipt_s=receipt_s,
                    overlap=self.options.overlap,
                    overlap_limit=self._overlap_limit,
                    shards=len(master.shards),
                )
            )
        if master.round >= cfg.rounds:
            raise RunFinished(f"run {cfg.run_name!r} is complete ({cfg.rounds} rounds)")

    @staticmethod
    def _train_from_guess(
        trainer: LocalTrainer,
        master: _Master,
        works: Sequence[RoundWork],
        codecs: Sequence[tuple[Codec, Codec]],
        shot: RoundSnapshot,
    ) -> dict[str, torch.Tensor]:
        """Move the model onto this peer's guess of the next master state, before overlapped training; the guess.

        The guess is each shard's outer step applied to this peer's own update as sent: what the
        round's aggregate would be if every peer had sent the same (the "eager" update of Kale et al.
        2025, fitted to a lossy code). Steps taken from the peer's own snapshot instead start from
        progress the sparse update left in the residual, which the run then counts twice
        (docs/experiments/overlap.md: on a GPU, where all of a round's steps ran before the aggregate
        came, the held-out loss rose after round 1). The encode that the guess needs runs before the
        overlapped steps start, so it is the one part of a round that overlap does not hide.
        """
        guess: dict[str, torch.Tensor] = {}
        for s, w, (upload, _) in zip(master.shards, works, codecs, strict=True):
            params = {name: master.params[name] for name in s.names}
            sent = upload.decode(w.payload, {name: tuple(t.shape) for name, t in params.items()})
            guess.update(s.outer.preview(params, sent))
        trainer.move_onto(guess, point=shot.current)
        return guess

    def _train(self, trainer: LocalTrainer, cfg: RunConfig, cancel: threading.Event) -> asyncio.Future[None]:
        """The round's inner steps in a worker thread, up to the local steps or until the time box is full."""
        return asyncio.ensure_future(
            asyncio.to_thread(trainer.train, max_steps=cfg.local_steps, stop=self._time_box_full, cancel=cancel)
        )

    def _time_box_full(self) -> bool:
        """True when one more step would leave too little time to upload before the round's deadline.

        The round opens, as this peer sees it, when the previous round's aggregate arrived; it plans
        with its own smoothed step time and its last upload's duration, and keeps a tenth of the
        deadline as margin (the aggregator opened the round a download earlier). Before the aggregate
        arrives (overlap) there is no deadline yet to plan against; a peer at its overlap limit waits
        here, in the training thread, until the aggregate has arrived or the run stops.
        """
        if not self._base_arrived.is_set() and self.trainer.round_steps >= self._stale_limit():
            self._base_arrived.wait()
        opened = self._round_opened
        if opened is None:
            return False
        step_s = self.trainer.step_s or 0.0
        deadline_s = self.cfg.round_deadline_s
        return time.monotonic() + step_s + self._upload_s > opened + (1 - TIME_BOX_MARGIN) * deadline_s

    def _stale_limit(self) -> int:
        """The most inner steps of a round that may run before its base arrives (PeerOptions.overlap_limit)."""
        return max(1, math.floor(self._overlap_limit * self.cfg.local_steps))

    def _after_drop(self, round_index: int, *, stale_steps: int, inner_steps: int) -> None:
        """After an update was dropped at round close: if most of its steps ran ahead of their base, let at most
        SAFE_OVERLAP_LIMIT of a round's steps do so from now on.

        An update trained mostly from the peer's guess of the state, not from the state itself, can fail the
        aggregator's held-out check though honest, and every such drop is a strike against the peer's key.
        """
        if not self.options.overlap or stale_steps * 2 <= inner_steps or self._overlap_limit <= SAFE_OVERLAP_LIMIT:
            return
        self._overlap_limit = SAFE_OVERLAP_LIMIT
        logger.warning(
            "round %d: the dropped update had %d of %d steps trained ahead of its base; overlap now waits for the "
            "base after %d steps (as --overlap-limit %g)",
            round_index,
            stale_steps,
            inner_steps,
            self._stale_limit(),
            SAFE_OVERLAP_LIMIT,
        )

    async def _resync(self, trainer: LocalTrainer, cancel: threading.Event) -> _Master:
        """Stop any early training, download the state again and restart the round from it."""
        if self._training is not None:
            cancel.set()
            self._base_arrived.set()
            with contextlib.suppress(Exception):
                await self._training
            self._training = None
            cancel.clear()
        master = await self._retrying("downloading the state", self._sync_from_any)
        await asyncio.to_thread(trainer.start_round, master.params, round_index=master.round)
        return master

    def make_update(self, master: _Master, work: RoundWork, trainer: LocalTrainer) -> tuple[SignedUpdate, bytes]:
        """The signed update for this round's work (one shard's, in a sharded run), signed by this peer.

        The one place an update is made, so the red-team harness (potluck/lab/redteam/) can replace it in a
        subclass; a normal peer never imports that.
        """
        cfg = master.cfg
        header = UpdateHeader(
            run_id=cfg.run_name,
            config_hash=cfg.config_hash,
            round=master.round,
            base_version=master.shards[work.shard].version,
            peer_public_key=self.identity.public_key,
            tokens=work.tokens,
            inner_steps=work.inner_steps,
            codec=work.codec or trainer.codec.name,
            payload_bytes=len(work.payload),
            payload_sha256=payload_digest(work.payload),
            nonce=new_nonce(),
            timestamp_s=time.time(),
        )
        return sign_update(header, self.identity), work.payload

    async def after_submit(self) -> None:
        """Called after each round's upload (a red-team subclass sends its extra uploads here)."""

    def make_trainer(self, cfg: RunConfig) -> LocalTrainer:
        """This peer's local trainer (a red-team subclass may corrupt its data)."""
        return LocalTrainer(
            cfg,
            public_key=self.identity.public_key,
            device=self.options.device,
            data_source=self.options.data,
            batch_size=self.options.batch_size,
            speed=self.options.speed,
        )

    async def _settle_late(self, r: int, shard: _Shard, aggregate: SignedAggregate) -> float | None:
        """Count the late update that `shard`'s round `r` took in (if any) and keep its receipt; its points."""
        late = self._late.get(shard.index)
        if late is None or late[0] != r:
            return None
        _, digest = self._late.pop(shard.index)
        counted = self.identity.public_key in dict(aggregate.header.contributors)
        if shard.index == 0:  # one late round, however many shards it was cut into
            self.accepted += counted
            self.rejected += not counted
        if not counted:
            logger.warning("round %d: the late update it took in was dropped at round close", r)
            return None
        points, _, _ = await self._collect_receipt(shard, r, digest, aggregate)
        return points

    async def _collect_receipt(
        self, shard: _Shard, round_index: int, digest: bytes, aggregate: SignedAggregate
    ) -> tuple[float | None, int, float]:
        """Fetch this round's final receipt from the shard's aggregator, check it (signature, Merkle proof), keep it.

        Returns (its points or None, bytes received, seconds taken). Never fatal: a missing or bad
        receipt is logged and reported as an event.
        """
        started = time.perf_counter()
        try:
            signed, t = await shard.link.fetch_receipt(round_index, digest)
        except (AggregatorUnreachable, AggregatorRefused) as e:
            logger.warning("round %d: no final receipt: %s", round_index, e)
            return None, 0, time.perf_counter() - started
        self.bytes_down += len(t.body)
        self.bytes_up += t.sent_bytes
        r = signed.receipt
        problem = check_receipt(signed, aggregate, aggregator_key=shard.key)
        if problem is None and (r.update_sha256, r.round) != (digest, round_index):
            problem = "it answers another update"
        if problem is not None:
            logger.warning("round %d: the aggregator's final receipt does not verify: %s", round_index, problem)
            self.on_event(ReceiptInvalid(round=round_index, detail=problem))
            return None, len(t.body), time.perf_counter() - started
        if self.options.receipts_dir is not None:
            try:
                await asyncio.to_thread(store_receipt, self.options.receipts_dir, signed, aggregate)
            except ReceiptError as e:
                logger.warning("round %d: %s", round_index, e)
        self.receipts += r.accepted
        self.score += r.score
        self.on_event(
            ReceiptReceived(
                round=round_index,
                accepted=r.accepted,
                tokens_credited=r.tokens_credited,
                score=r.score,
                reason=r.reason,
                update=digest.hex()[:16],
                shard=shard.index,
            )
        )
        return r.score, len(t.body), time.perf_counter() - started

    def _apply(self, master: _Master, shard: _Shard, signed: SignedAggregate, payload: bytes) -> bool:
        """Verify and apply one shard's aggregate to the peer's master copy; False when it must resync instead.

        The master's round moves on once every shard's aggregate is applied (the caller's job).
        """
        try:
            apply_aggregate(
                signed,
                payload,
                cfg=master.cfg,
                source=shard.key,
                round_index=master.round,
                density=shard.density,
                params={name: master.params[name] for name in shard.names},  # the same tensors: stepped in place
                outer=shard.outer,
            )
        except ReplicaError as e:
            logger.warning("round %d: %s; downloading the state again", master.round, e)
            return False
        shard.version = signed.header.new_version
        shard.density = signed.header.next_density
        return True

    async def _aggregate_of(
        self, shard: _Shard, r: int, update: SignedUpdate, payload: bytes, *, timeout_s: float
    ) -> tuple[SignedAggregate, bytes, Transfer]:
        """Round `r`'s aggregate of `shard`; after a fail-over the update first goes to the new aggregator.

        The standby that took the shard over never saw an update sent to the primary before it went, and
        its round waits for the peers the primary last heard from.
        """
        sent_to = shard.key

        async def attempt() -> tuple[SignedAggregate, bytes, Transfer]:
            nonlocal sent_to
            if shard.key != sent_to:
                await shard.link.submit(update, payload)
                sent_to = shard.key
            return await shard.link.fetch_aggregate(r, timeout_s=timeout_s)

        return await self._retrying("fetching the aggregate", attempt, shard=shard)

    async def _failover(self, shard: _Shard) -> bool:
        """Move `shard` to another aggregator the run's config lists for it and the DHT announces (its standby).

        False when there is none yet (a standby announces itself only once it has taken the shard over).
        """
        try:
            announced = await self._announcements()
        except AggregatorUnreachable:
            return False
        cfg = self.cfg
        owners = set(keys_of_shard(cfg.aggregator_keys, shard.index, cfg.shards))
        others = [
            a
            for a in announced
            if public_key_to_hex(a.public_key) in owners and a.public_key not in (shard.key, *self.abandoned)
        ]
        if not others:
            return False
        gone, chosen = shard.key, max(others, key=lambda a: a.timestamp_s)
        self.abandoned.add(gone)
        shard.announcement = chosen
        shard.link = AggregatorLink(self.node.p2p, await self._connect(chosen))
        if self.announcement.public_key == gone:
            self.announcement, self.link = chosen, shard.link
        moved = Failover(shard=shard.index, from_=fingerprint(gone), to=fingerprint(chosen.public_key))
        logger.warning("shard %d: aggregator %s is gone; switching to %s", moved.shard, moved.from_, moved.to)
        self.on_event(moved)
        return True

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], *, shard: _Shard | None = None) -> T:
        """`call()`, retried with backoff while the aggregator (`shard`'s) is unreachable, up to reconnect_timeout_s.

        A shard whose aggregator has not answered for FAILOVER_AFTER_S moves to its standby once the DHT
        announces one, with a fresh reconnect budget.
        """
        deadline = time.monotonic() + self.options.reconnect_timeout_s
        failing_since = time.monotonic()
        delay_s = 0.5
        while True:
            try:
                return await call()
            except AggregatorUnreachable as e:
                now = time.monotonic()
                if shard is not None and now - failing_since >= FAILOVER_AFTER_S and await self._failover(shard):
                    failing_since, delay_s = now, 0.5
                    deadline = now + self.options.reconnect_timeout_s
                    continue
                if time.monotonic() + delay_s > deadline:
                    raise PeerError(
                        f"gave up {what} after {self.options.reconnect_timeout_s:.0f} s: {e}; is the aggregator up?"
                    ) from e
                logger.warning("%s: %s; retrying in %.1f s", what, e, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)
                target = shard.announcement if shard is not None else getattr(self, "announcement", None)
                if target is not None:
                    await self._connect(target)
            except AggregatorRefused as e:
                if e.code is RefusalCode.RUN_FINISHED:
                    raise RunFinished(str(e)) from e
                raise


def _on_link(shard: _Shard, method: Callable[..., Awaitable[T]], *args: object, **kwargs: object) -> Awaitable[T]:
    """`method` called on the shard's link as it is when called (a fail-over may have replaced it since)."""
    return method(shard.link, *args, **kwargs)


def _total(points: Sequence[float | None]) -> float | None:
    """The sum of the points given, None when none was credited."""
    credited = [p for p in points if p is not None]
    return math.fsum(credited) if credited else None


def _merged(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Bytes per donor over several downloads (one per shard)."""
    merged: dict[str, int] = {}
    for c in counts:
        for name, n in c.items():
            merged[name] = merged.get(name, 0) + n
    return merged


def join_addresses(values: Sequence[str]) -> tuple[str, ...]:
    """Validate `--join` values early, so a typo fails in milliseconds with the expected form."""
    if not values:
        raise JoinError("no --join address given; pass the status page URL or the multiaddr the aggregator printed")
    for value in values:
        parse_join_address(value)
    return tuple(values)
