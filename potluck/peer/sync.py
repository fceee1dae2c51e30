"""Finding the run's aggregators and downloading the state from them; retries and fail-over when one goes quiet.

The peer never trusts an aggregator key the run's config does not list. A state that fails
verification marks its source: that aggregator is never asked again. A call that gets no answer is
retried with jittered exponential backoff (the aggregator may be restarting), the aggregator is looked up
again on the DHT, and a shard whose aggregator stays silent moves to its standby once one is announced.
"""

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from potluck.errors import PotluckError
from potluck.events import DonorDropped, Event, Failover, PeerSynced, StateRefused
from potluck.peer.discovery import SkipLog, usable_announcements
from potluck.peer.holder_trust import Members, state_members
from potluck.peer.options import PeerError, PeerOptions, RunFinished
from potluck.peer.records import HeldOutScore, Master, Shard, Tally
from potluck.peer.state_download import Donor, DownloadFailed, Fetched, fetch_chunks
from potluck.peer.trust import Root, choose_root, keep_pin, read_pin, root_from_join
from potluck.protocol.backoff import backoff_s
from potluck.protocol.client import AggregatorLink, AggregatorRefused, AggregatorUnreachable
from potluck.protocol.config import RunConfig
from potluck.protocol.dht_schema import AGGREGATORS_KEY, AggregatorAnnouncement, parse_announcements
from potluck.protocol.envelope import EnvelopeError, StateHeader
from potluck.protocol.holder_records import HolderRecord, lookup_holders
from potluck.protocol.identity import Identity, fingerprint, public_key_from_hex, public_key_to_hex
from potluck.protocol.messages import MessageError, config_in_head
from potluck.protocol.node import Node, dial, peer_id_of
from potluck.protocol.shards import keys_of_shard
from potluck.protocol.state_chunks import ChunkError, ChunkRequest, check_manifest
from potluck.protocol.wire import RefusalCode
from potluck.tasks import check_tokenizer, run_shapes, run_task
from potluck.training.replica import ReplicaError, check_state

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)
T = TypeVar("T")

FAILOVER_AFTER_S = 10.0  # a shard's aggregator silent this long: switch to its standby once one is announced
MAX_DONORS = 8  # holding peers one state download asks besides the aggregator
HOLDER_CHUNK_TIMEOUT_S = 15.0  # a holding peer that sends a chunk no sooner is dropped (8 MiB at 5 Mbit/s)
RETRY_BASE_S = 0.5  # the first retry of an unreachable aggregator comes within this; each later one doubles it
RETRY_CAP_S = 10.0  # the most any wait between retries can be


class UntrustedState(PotluckError):
    """An aggregator served a state that fails verification; the peer tries another source."""

    def __init__(self, source: bytes, detail: str) -> None:
        super().__init__(detail)
        self.source = source  # the aggregator's key: never asked again


class Sync:
    """The peer's view of the run's aggregators: which to ask, how to reach them, and the state they serve."""

    def __init__(
        self,
        node: Node,
        identity: Identity,
        options: PeerOptions,
        *,
        join_addrs: Sequence["Multiaddr"],
        tally: Tally,
        score: HeldOutScore,
        on_event: Callable[[Event], None],
    ) -> None:
        self.node = node
        self.identity = identity
        self.options = options
        self.join_addrs = list(join_addrs)
        self.tally = tally
        self.score = score
        self.on_event = on_event
        self.refused_sources: set[bytes] = set()  # aggregator keys whose state did not check out
        self.abandoned: set[bytes] = set()  # aggregator keys that stopped answering and were failed over from
        self.bad_donors: set[bytes] = set()  # holder keys that sent a chunk the manifest refutes
        # The aggregator the peer syncs from first, and its link: None until the first lookup found one.
        self.announcement: AggregatorAnnouncement | None = None
        self.link: AggregatorLink | None = None
        self.cfg: RunConfig | None = None  # the run's config, from the last state downloaded
        self.synced_at = time.monotonic()  # when that state arrived: the first round's time box counts from here
        self.skips = SkipLog()  # announcements skipped, each logged once
        # The aggregator keys trusted before the run's config is known (trust.py): None until found.
        self.root: Root | None = None
        self.pinned = None if options.trust_file is None else read_pin(options.trust_file)  # TrustError: now

    # ----------------------------------------------------------------- discovery

    async def announcements(self, cfg: RunConfig | None = None) -> list[AggregatorAnnouncement]:
        """This run's aggregator announcements on the DHT, from sources that have not served a bad state.

        `cfg`: the run's config when it is known before `self.cfg` is (the first shard's, in a sharded run).

        Another version's or another run's announcement is skipped, never fatal (discovery.py): anyone can
        write one. Before the run's config is known only the trust root's keys count (trust.py), then the
        config's; only those can tell this peer to upgrade.
        """
        cfg, root = cfg or self.cfg, None
        if cfg is None:
            root = await self.trust_root()
        result = await self.node.dht.get(AGGREGATORS_KEY, latest=True)
        try:
            announcements = usable_announcements(
                parse_announcements(result),
                run=self.options.run if cfg is None else cfg.run_name,
                run_keys=root.hex_keys if root is not None else cfg.aggregator_keys if cfg is not None else (),
                joined={peer_id_of(a).to_bytes() for a in self.join_addrs},
                log=self.skips,
            )
        except AggregatorUnreachable as e:
            if root is None:
                raise
            raise AggregatorUnreachable(f"{e} (this peer trusts only {root.source})") from e
        trusted = [a for a in announcements if a.public_key not in self.refused_sources]
        if not trusted:
            raise AggregatorUnreachable(
                f"every aggregator on the DHT ({len(announcements)}) served a state that does not check out"
            )
        alive = [a for a in trusted if a.public_key not in self.abandoned]  # a gone one's record lingers a while
        return alive or trusted

    async def trust_root(self) -> Root:
        """The aggregator keys this peer trusts before it has the run's config (trust.py), found once.

        AggregatorUnreachable (retried) while neither --aggregator-key, the --join node nor a pin gives any.
        """
        if self.root is None:
            proven, why = None, None
            if not self.options.aggregator_keys:
                try:
                    proven = await root_from_join(
                        self.node,
                        self.join_addrs,
                        requester=self.identity.public_key,
                        client_mode=self.options.client_mode,
                        run=self.options.run,
                    )
                except AggregatorUnreachable as e:
                    why = e
            root = choose_root(
                flag_keys=self.options.aggregator_keys,
                proven=proven,
                pinned=self.pinned,
                run=self.options.run,
                pin_path=self.options.trust_file,
            )
            if root is None:
                assert why is not None  # choose_root finds nothing only when the --join node proved nothing
                raise why
            logger.info("trusting %d aggregator key(s): %s", len(root.keys), root.source)
            self.root = root
        return self.root

    async def find_aggregator(self) -> AggregatorLink:
        """The aggregator to sync from first: the one named with --join when it is announced, else the newest."""
        announcements = await self.announcements()
        # Prefer the aggregator the user named with --join: anyone can announce a run on an open DHT.
        joined = {peer_id_of(a).to_bytes() for a in self.join_addrs}
        named = [a for a in announcements if a.libp2p_peer_id in joined]
        chosen = max(named or announcements, key=lambda a: a.timestamp_s)
        self.announcement = chosen
        self.link = AggregatorLink(self.p2p, await self.connect(chosen))
        return self.link

    @property
    def p2p(self) -> "P2P":
        """The node's libp2p daemon, which carries the streams to aggregators and holders."""
        return self.node.p2p

    async def connect(self, announcement: AggregatorAnnouncement) -> "PeerID":
        """Dial an announced aggregator (at the --join address when it is the one named there); its peer id."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        peer_id = PeerID(announcement.libp2p_peer_id)
        if any(peer_id_of(a) == peer_id for a in self.join_addrs):
            maddrs = [a for a in self.join_addrs if peer_id_of(a) == peer_id]
        else:
            maddrs = [Multiaddr(m) for m in announcement.maddrs]
        await dial(self.p2p, peer_id, maddrs)
        return peer_id

    # ----------------------------------------------------------------- the state

    async def sync_from_any(self) -> Master:
        """The run's state from the preferred aggregator; one that serves a bad state is dropped for another.

        A state that fails verification is not a network hiccup: its source is never asked again, and
        the next announced aggregator is tried. With none left this raises AggregatorUnreachable, so the
        caller keeps looking (new aggregators may announce) until its reconnect timeout.
        """
        while True:
            if self.announcement is None or self.announcement.public_key in self.refused_sources:
                await self.find_aggregator()
            try:
                return await self._sync()
            except AggregatorUnreachable:
                # look again before the retry: a standby may have taken the shard over from a dead aggregator
                # whose announcement lingers until it expires
                with contextlib.suppress(AggregatorUnreachable):
                    await self.find_aggregator()
                raise
            except UntrustedState as e:
                source = fingerprint(e.source)
                self.refused_sources.add(e.source)
                logger.info("aggregator %s: %s; trying another source", source, e)
                self.on_event(StateRefused(aggregator=source, detail=str(e)))

    async def _sync(self) -> Master:
        """The whole master state: from the preferred aggregator, then from each other shard's (sharded runs)."""
        assert self.announcement is not None and self.link is not None  # sync_from_any found one
        before = self.tally.bytes_down
        sources: list[Fetched] = []
        cfg, h, first, params = await self._fetch_shard(self.announcement, self.link, sources=sources)
        shards = {first.index: first}
        if cfg.shards > 1:
            announced = await self.announcements(cfg)  # the trusted first shard's config names the others
            for index in range(cfg.shards):
                if index in shards:
                    continue
                owners = set(keys_of_shard(cfg.aggregator_keys, index, cfg.shards))
                candidates = [a for a in announced if public_key_to_hex(a.public_key) in owners]
                if not candidates:
                    raise AggregatorUnreachable(f"no aggregator of shard {index + 1} of {cfg.shards} is announced yet")
                chosen = max(candidates, key=lambda a: a.timestamp_s)
                link = AggregatorLink(self.p2p, await self.connect(chosen))
                _, other, shard, part = await self._fetch_shard(chosen, link, sources=sources, cfg=cfg)
                if other.round != h.round:  # one shard closed its round a moment before the other
                    raise AggregatorUnreachable(
                        f"shard {index + 1} is at round {other.round}, shard {first.index + 1} at round {h.round}"
                    )
                shards[index] = shard
                params |= part
        shapes = run_shapes(cfg)
        params = {name: params[name] for name in shapes}  # the model's order: payloads depend on it
        val_loss = await self.score(cfg, params)
        self.cfg, self.synced_at = cfg, time.monotonic()
        keep_pin(self.options.trust_file, cfg.run_name, cfg.aggregator_keys)  # a restart trusts only these
        logger.info("synced run %r at round %d from %s", cfg.run_name, h.round, fingerprint(first.key))
        self.on_event(
            PeerSynced(
                run=cfg.run_name,
                round=h.round,
                aggregator=fingerprint(first.key),
                fingerprint=self.identity.fingerprint,
                state_bytes=self.tally.bytes_down - before,
                # who gave the state's chunks (bytes per donor, the aggregator's and peers' alike)
                state_sources=_merged([f.bytes_by_donor for f in sources]),
                shards=cfg.shards,
                val_loss=val_loss,  # the state's held-out loss (PeerOptions.eval_batches)
            )
        )
        return Master(cfg=cfg, round=h.round, params=params, shards=[shards[i] for i in range(cfg.shards)])

    async def _fetch_shard(
        self,
        announcement: AggregatorAnnouncement,
        link: AggregatorLink,
        *,
        sources: list[Fetched],
        cfg: RunConfig | None = None,
    ) -> tuple[RunConfig, StateHeader, Shard, dict[str, torch.Tensor]]:
        """One aggregator's state, checked: its signature, its config (`cfg`'s, when given), its shard's shapes.

        The aggregator sends the signed manifest; the chunks come from it and every peer that holds the
        same shard at the same version (state_download.py). Who gave the chunks is added to `sources`.
        """
        signed, digest_bytes, t = await link.fetch_manifest(
            self.identity.public_key, client_mode=self.options.client_mode
        )
        self.tally.bytes_down += len(t.body) + t.sent_bytes
        source = announcement.public_key
        try:
            signed.verify({source})
            digests = check_manifest(signed.header, digest_bytes)
        except (EnvelopeError, ChunkError) as e:
            raise UntrustedState(source, f"its state does not check out: {e}") from e
        first = None
        if cfg is None:  # the preferred aggregator's state: the run's task is checked before the bulk comes
            first = await self._check_task_first(signed.header, digests[0], link, source=source)
        fetched = await self._fetch_chunks(signed.header, digests, link, first=first)
        try:
            state = await asyncio.to_thread(check_state, signed, fetched.payload, source=source, shapes_of=run_shapes)
        except ReplicaError as e:
            raise UntrustedState(source, str(e)) from e
        if cfg is None:
            check_tokenizer(state.cfg, self.options.tokenizer)
        elif state.cfg.config_hash != cfg.config_hash:
            raise UntrustedState(source, "it serves another run config than the run's other shards")
        sources.append(fetched)
        shard = Shard(
            index=state.shard,
            names=tuple(state.params),
            announcement=announcement,
            link=link,
            version=state.header.new_version,
            outer=state.outer,
            density=state.header.density,
        )
        return state.cfg, state.header, shard, state.params

    async def _check_task_first(self, h: StateHeader, digest: bytes, link: AggregatorLink, *, source: bytes) -> bytes:
        """Read the run's config from the state's first chunk and build its task here, before the download.

        A volunteer who cannot train the run (its task does not import here, or builds another architecture)
        learns it in one line (TaskError) before the state's bulk comes down. A config too large for the
        first chunk is checked once the state is in (check_state does it for every state). The chunk, which
        the download then keeps.
        """
        chunk, t = await link.fetch_chunk(_chunk_request(h, 0))
        self.tally.bytes_down += len(chunk) + t.sent_bytes
        if hashlib.sha256(chunk).digest() != digest:
            raise UntrustedState(source, "its state's first chunk does not match its signed manifest")
        try:
            cfg = config_in_head(chunk)
        except MessageError as e:
            raise UntrustedState(source, f"its state does not check out: {e}") from e
        if cfg is None:
            return chunk
        if cfg.config_hash != h.config_hash or public_key_to_hex(source) not in cfg.aggregator_keys:
            raise UntrustedState(source, "it serves a config that does not trust it or does not match its signed hash")
        check_tokenizer(cfg, self.options.tokenizer)  # TaskMismatch, as below: this node's own problem
        await asyncio.to_thread(run_task, cfg)  # TaskError, TaskMismatch
        return chunk

    async def _fetch_chunks(
        self, h: StateHeader, digests: list[bytes], link: AggregatorLink, *, first: bytes | None = None
    ) -> Fetched:
        """The payload `h` signs, in chunks from its aggregator and from the peers the DHT says hold it.

        `first`: the first chunk, already fetched from the aggregator (kept, not asked for again).
        """

        def request(index: int) -> ChunkRequest:
            return _chunk_request(h, index)

        def donor(name: str, to: AggregatorLink, *, streams: int, timeout_s: float | None = None) -> Donor:
            async def fetch(index: int) -> bytes:
                chunk, t = await to.fetch_chunk(request(index))
                self.tally.bytes_down += len(chunk) + t.sent_bytes
                return chunk

            return Donor(name=name, fetch=fetch, streams=streams, timeout_s=timeout_s)

        # A fast donor serves more chunks than a slow one. Two chunks in flight keep the aggregator's fat
        # link busy across each request's round trip; one per peer leaves each peer's few chunk slots
        # (MAX_CHUNK_STREAMS) to several joiners at once. The holders are looked up while the aggregator
        # already gives chunks.
        aggregator = donor(fingerprint(h.aggregator_public_key), link, streams=2)
        names = {aggregator.name: h.aggregator_public_key}

        async def holders() -> list[Donor]:
            # believed only from the run's members (holder_trust.py), whose count also says where their records are
            aggregators = () if self.cfg is None else [public_key_from_hex(k) for k in self.cfg.aggregator_keys]
            members = await state_members(link, h, aggregators=aggregators)
            self.tally.bytes_down += members.bytes_down
            records = await self._holders(h, members)
            random.shuffle(records)  # joiners arriving together spread over the holders
            records = records[:MAX_DONORS]
            links = await asyncio.gather(*(self._holder_link(r) for r in records))
            found = [(r, to) for r, to in zip(records, links, strict=True) if to is not None]
            names.update((fingerprint(r.holder), r.holder) for r, _ in found)
            return [donor(fingerprint(r.holder), to, streams=1, timeout_s=HOLDER_CHUNK_TIMEOUT_S) for r, to in found]

        try:
            fetched = await fetch_chunks(
                digests,
                payload_bytes=h.payload_bytes,
                chunk_bytes=h.chunk_bytes,
                donors=[aggregator],
                more=holders(),
                known=None if first is None else (0, aggregator.name, first),
            )
        except DownloadFailed as e:
            raise AggregatorUnreachable(str(e)) from e
        for name, reason in fetched.dropped.items():
            key = names[name]
            if key != h.aggregator_public_key and name in fetched.refuted:
                self.bad_donors.add(key)  # it sent a chunk the signed manifest refutes: never asked again
            self.on_event(DonorDropped(donor=name, reason=reason, shard=h.shard))
        return fetched

    async def _holders(self, h: StateHeader, members: Members) -> list[HolderRecord]:
        """Members whose DHT record says they hold shard `h.shard` at `h.new_version` (a few buckets' worth)."""
        trusted = members.keys - self.bad_donors - {self.identity.public_key}
        try:
            records = await asyncio.wait_for(
                lookup_holders(
                    self.node.dht,
                    config_hash=h.config_hash,
                    shard=h.shard,
                    version=h.new_version,
                    contributors=members.contributors,
                    trusted=trusted,
                ),
                timeout=30,
            )
        except (TimeoutError, asyncio.TimeoutError):
            return []
        return [r for r in records if r.version_of(h.shard) == h.new_version]

    async def _holder_link(self, record: HolderRecord) -> AggregatorLink | None:
        """A link to a holding peer, dialled; None when its record's addresses do not parse."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        try:
            peer_id = PeerID(record.libp2p_peer_id)
            maddrs = [Multiaddr(m) for m in record.maddrs]
        except Exception:  # a record's contents are untrusted; hivemind raises several types on garbage
            return None
        await dial(self.p2p, peer_id, maddrs, timeout_s=5)
        return AggregatorLink(self.p2p, peer_id)

    # ----------------------------------------------------------------- retries and fail-over

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]], *, shard: Shard | None = None) -> T:
        """`call()`, retried with backoff while the aggregator (`shard`'s) is unreachable, up to reconnect_timeout_s.

        A shard whose aggregator has not answered for FAILOVER_AFTER_S moves to its standby once the DHT
        announces one, with a fresh reconnect budget.
        """
        deadline = time.monotonic() + self.options.reconnect_timeout_s
        failing_since = time.monotonic()
        attempt = 0
        while True:
            try:
                return await call()
            except AggregatorUnreachable as e:
                now = time.monotonic()
                if e.code is RefusalCode.BUSY:  # it answered: up, at its limit; not a reason to fail over
                    failing_since = now
                if shard is not None and now - failing_since >= FAILOVER_AFTER_S and await self.failover(shard):
                    failing_since, attempt = now, 0
                    deadline = now + self.options.reconnect_timeout_s
                    continue
                # jittered: the peers that lost a restarting aggregator together must not retry in lock-step
                delay_s = backoff_s(attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S)
                attempt += 1
                if time.monotonic() + delay_s > deadline:
                    raise PeerError(
                        f"gave up {what} after {self.options.reconnect_timeout_s:.0f} s: {e}; is the aggregator up?"
                    ) from e
                logger.warning("%s: %s; retrying in %.1f s", what, e, delay_s)
                await asyncio.sleep(delay_s)
                target = shard.announcement if shard is not None else self.announcement
                if target is not None:
                    await self.connect(target)
            except AggregatorRefused as e:
                if e.code is RefusalCode.RUN_FINISHED:
                    raise RunFinished(str(e)) from e
                raise

    async def failover(self, shard: Shard) -> bool:
        """Move `shard` to another aggregator the run's config lists for it and the DHT announces (its standby).

        False when there is none yet (a standby announces itself only once it has taken the shard over).
        """
        try:
            announced = await self.announcements()
        except AggregatorUnreachable:
            return False
        cfg = self.cfg
        assert cfg is not None  # a shard exists only once a state was downloaded
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
        shard.link = AggregatorLink(self.p2p, await self.connect(chosen))
        if self.announcement is not None and self.announcement.public_key == gone:
            self.announcement, self.link = chosen, shard.link
        moved = Failover(shard=shard.index, from_=fingerprint(gone), to=fingerprint(chosen.public_key))
        logger.warning("shard %d: aggregator %s is gone; switching to %s", moved.shard, moved.from_, moved.to)
        self.on_event(moved)
        return True


def _chunk_request(h: StateHeader, index: int) -> ChunkRequest:
    """The request for chunk `index` of the state `h` signs."""
    return ChunkRequest(
        shard=h.shard, version=h.new_version, payload_sha256=h.payload_sha256, chunk_bytes=h.chunk_bytes, index=index
    )


def _merged(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Bytes per donor over several downloads (one per shard)."""
    merged: dict[str, int] = {}
    for c in counts:
        for name, n in c.items():
            merged[name] = merged.get(name, 0) + n
    return merged
