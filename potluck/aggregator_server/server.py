"""The aggregator server: a DHT bootstrap node that collects signed updates, closes rounds and serves state.

One asyncio loop runs everything: hivemind's DHT node (whose libp2p daemon carries the streams), the
stream handlers (handlers.py), the DHT announcements (announcer.py), and the round loop here. What a
round accepts and how it closes is the round keeper's (keeper.py), which knows nothing of streams;
this module starts and stops the node, runs the round loop, publishes closed rounds and serves state.
Heavy arithmetic (decoding, aggregating, checkpointing, evaluating) runs in worker threads so the
handlers stay responsive.

Aggregates are delivered by long-poll: a peer asks for round r's aggregate and the reply comes when
round r closes. The last few aggregates stay in memory (closed_rounds.py; the last one also in the
checkpoint), so a peer that asks a little late still gets it; one that asks too late downloads the
state again.

Durability: an accepted update is spooled to `--state-dir` before its receipt goes out; a closed
round's ledger rows (incentives/ledger.py) are committed, then its state is checkpointed, and only
then is its aggregate published. A restart on the same directory resumes at the checkpointed round
with its spooled updates; if the ledger already holds that round (the process died between the two
writes), the round is closed again exactly as the ledger recorded it, not judged anew.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from potluck.aggregator_server.accounting import head_event, open_ledger
from potluck.aggregator_server.announcer import Announcer
from potluck.aggregator_server.closed_rounds import ClosedRound, ClosedRounds
from potluck.aggregator_server.closing import Deferred
from potluck.aggregator_server.handlers import Refusal, StreamHandlers
from potluck.aggregator_server.keeper import RoundKeeper
from potluck.aggregator_server.master import MasterState
from potluck.aggregator_server.reports import leaderboard, round_event
from potluck.aggregator_server.reputation import Reputation
from potluck.aggregator_server.rounds import OpenRound
from potluck.aggregator_server.served_state import ServedState, ServedStates
from potluck.aggregator_server.standby import Standby
from potluck.aggregator_server.startup import place, resume
from potluck.events import (
    AggregatorDone,
    AggregatorReady,
    Banned,
    Event,
    Joined,
    RoundOpened,
    Takeover,
    Unbanned,
)
from potluck.protocol.chunk_server import (
    AGGREGATOR_CHUNK_STREAMS,
    AGGREGATOR_CHUNK_STREAMS_PER_PEER,
    Pacer,
    chunk_handler,
)
from potluck.protocol.codecs import Codec
from potluck.protocol.config import RunConfig
from potluck.protocol.identity import Identity, fingerprint, public_key_to_hex
from potluck.protocol.messages import CHUNK_HANDLER, parse_state_request_mode
from potluck.protocol.node import Node, start_node
from potluck.protocol.state_chunks import ChunkRequest
from potluck.protocol.wire import RefusalCode
from potluck.tasks.held_out import HeldOutLoss
from potluck.training.diloco import state_sha256

logger = logging.getLogger(__name__)

LINGER_DRAIN_S = 1.0  # after the last reply is written, before p2pd stops: time for it to leave
JOIN_BARRIER_S = 60.0  # the longest a joiner of the first round waits for the others (see wait_for_peers)
FIRST_ROUND_WAIT = 3  # deadlines the first round may wait for --wait-for-peers before it closes anyway

LEDGER_FILE = "ledger.sqlite"
# p2pd keeps 512 connections by default: fewer than a large run's volunteers (ServerOptions.max_connections)
DEFAULT_MAX_CONNECTIONS = 4096


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerOptions:
    """How this aggregator process runs (the run itself is the RunConfig)."""

    state_dir: Path
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    initial_peers: tuple[str, ...] = ()
    multiaddr_file: Path | None = None
    max_rounds: int | None = None  # leave after closing this many rounds (None: until the run's last round)
    eval_batches: int = 8
    linger_s: float = 20.0  # after the last round, keep serving its aggregate this long for slow peers
    announce_every_s: float = 10.0
    # Keep the first round open (up to FIRST_ROUND_WAIT deadlines) until this many peers have downloaded the
    # state: a local swarm's peers start together, and a round closed before most joined is judged on too few.
    # The state is handed out when they are all here (or after JOIN_BARRIER_S), so they start training together
    # and the first to arrive does not train alone and then idle while the others start.
    wait_for_peers: int = 0
    # A standby (a key listed after its shard's owner) takes the shard over once its primary has not
    # answered for this long and has not re-announced itself on the DHT for as long (standby.py).
    failover_after_s: float = 20.0
    # Cap on the bytes per second of state chunks sent to joiners (None: as fast as the link goes): an
    # operator's way to keep rounds' traffic ahead of joiners', who then take more from holding peers.
    state_upload_bytes_per_s: float | None = None
    # Connections its p2pd keeps before trimming the oldest (create_p2p): every volunteer holds one, each
    # costs the daemon about 1 MB, and a trimmed one loses its streams (long-polls included) and redials.
    max_connections: int = DEFAULT_MAX_CONNECTIONS


class AggregatorServer:
    """One aggregator process; `await serve()` runs it until the run or `max_rounds` is done."""

    def __init__(
        self, cfg: RunConfig, identity: Identity, options: ServerOptions, *, on_event: Callable[[Event], None]
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.options = options
        self.on_event = on_event
        self.shard, names, self.primary = place(cfg, identity)
        master, checkpoint = resume(cfg, options.state_dir, names=names)  # the checkpoint's, or the first
        closed = ClosedRounds()
        if checkpoint is not None and checkpoint.last_aggregate is not None:
            closed.add(ClosedRound(index=checkpoint.round - 1, aggregate=checkpoint.last_aggregate))
        self.resumed = checkpoint is not None
        self.ledger = open_ledger(options.state_dir / LEDGER_FILE, identity=identity, round_index=master.round)
        # A shard's aggregator holds part of the model: it cannot score the held-out loss (peers can, see
        # PeerOptions.eval_batches), so it loads neither the held-out batches nor a model to score them with.
        scorer = HeldOutLoss(cfg, batches=options.eval_batches) if cfg.shards == 1 else None
        if scorer is not None:
            scorer.load()
        self.reputation = Reputation.open(
            options.state_dir,
            ban_after=cfg.validation.ban_after_rejections,
            window_rounds=cfg.validation.ban_window_rounds,
        )
        self.keeper = RoundKeeper(
            cfg,
            identity,
            master,
            state_dir=options.state_dir,
            ledger=self.ledger,
            reputation=self.reputation,
            scorer=scorer,
            on_event=self._emit,
            closed=closed,
        )
        self.handlers = StreamHandlers(self)
        self.announcer = Announcer(
            cfg, identity, reputation=self.reputation, ban=self._ban_run_wide, every_s=options.announce_every_s
        )
        self.fetches: dict[int, int] = {}  # round -> aggregate downloads served
        self.receipts_served: dict[int, int] = {}  # round -> final receipts served
        self.bytes_in = 0  # request bodies received (uploads, mostly)
        self.bytes_out = 0  # reply bodies sent (state, aggregates, receipts)
        self.maddrs: list[str] = []
        self.node: Node | None = None
        self.peer_id: bytes = b""  # this node's libp2p peer id, once it runs
        self.lock = asyncio.Lock()  # held while the open round changes (an upload judged, a close, a join)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the keeper's events go to
        self._close_requested = False  # an admin asked to close the open round now
        self._published = asyncio.Condition()
        self._wake = asyncio.Event()
        self._all_here = asyncio.Event()  # the first round's wait_for_peers have all downloaded the state
        self._served = ServedStates(cfg, identity, shard=self.shard)
        self.keeper.restore_spool()

    @property
    def master(self) -> MasterState:
        """The current master state (the open round's base)."""
        return self.keeper.master

    @property
    def current(self) -> OpenRound:
        """The open round."""
        return self.keeper.current

    @property
    def codec(self) -> Codec:
        """The open round's upload codec."""
        return self.keeper.codec

    @property
    def aggregate_codec(self) -> Codec:
        """The open round's aggregate codec."""
        return self.keeper.aggregate_codec

    @property
    def rounds_closed(self) -> int:
        """Rounds this process has closed."""
        return self.keeper.rounds_closed

    @property
    def finished(self) -> bool:
        """Whether this aggregator is done with the run (or, a standby, the run ended under its primary)."""
        return self.keeper.finished

    def wake(self) -> None:
        """Have the round loop (and the linger) look again: the open round or the downloads changed."""
        self._wake.set()

    def _emit(self, event: Event) -> None:
        """Pass a keeper's event on, on the event loop's thread (a round closes in a worker thread)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is not None and self._loop.is_running():
                self._loop.call_soon_threadsafe(self.on_event, event)
                return
        self.on_event(event)

    # ----------------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        """Start the node, serve rounds until done, linger for late downloads, shut everything down."""
        self._loop = asyncio.get_running_loop()
        node = await start_node(
            initial_peers=self.options.initial_peers,
            host_maddrs=self.options.host_maddrs,
            announce_maddrs=self.options.announce_maddrs,
            identity_path=self.options.state_dir / "libp2p.key",
            signer=self.identity,
            max_connections=self.options.max_connections,
        )
        announcer: asyncio.Task[None] | None = None
        try:
            p2p = node.p2p
            self.node = node
            cap = self.options.state_upload_bytes_per_s
            # a standby serves chunks of the copy it follows from the start: it holds the shard's state too
            await p2p.add_binary_stream_handler(
                CHUNK_HANDLER,
                chunk_handler(
                    self.find_chunk_payload,
                    on_served=self._chunk_sent,
                    max_streams=AGGREGATOR_CHUNK_STREAMS,
                    per_peer=AGGREGATOR_CHUNK_STREAMS_PER_PEER,
                    pacer=None if cap is None else Pacer(cap),
                ),
            )
            if self.primary is None:
                await self.handlers.register(p2p)
            self.maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
            self.peer_id = p2p.peer_id.to_bytes()
            self._write_multiaddr_file()
            self.on_event(await self._ready_event())
            if self.primary is not None:  # a standby serves nothing until it takes over
                if not await self._stand_by(node):
                    return  # the run ended under the primary
                await self.handlers.register(p2p)
            self.current.extend()  # the first deadline counts from now, not from loading the checkpoint
            self._round_opened()
            announcer = asyncio.create_task(
                self.announcer.announce_forever(
                    node, peer_id=self.peer_id, maddrs=self.maddrs, round=lambda: self.master.round
                )
            )
            await self._round_loop()
            await self._linger()
        finally:
            if announcer is not None:
                announcer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await announcer
            await node.shutdown()
            self.ledger.close()
            self.reputation.close()
        self.on_event(AggregatorDone(round=self.master.round, rounds_closed=self.rounds_closed))

    async def _ready_event(self) -> AggregatorReady:
        """The event that says this aggregator is up: where, which run, which round, and the state it serves."""
        val_loss = await asyncio.to_thread(self.keeper.evaluate, self.master.params)
        return AggregatorReady(
            maddrs=tuple(self.maddrs),
            fingerprint=self.identity.fingerprint,
            run=self.cfg.run_name,
            config_hash=self.cfg.config_hash,
            round=self.master.round,
            resumed=self.resumed,
            spooled_updates=len(self.current.accepted),
            val_loss=val_loss,
            num_params=sum(t.numel() for t in self.master.params.values()),  # this shard's
            shard=self.shard,
            shards=self.cfg.shards,
            state_sha256=state_sha256(self.master.params).hex(),
            rounds_total=self.cfg.rounds,
            round_deadline_s=self.cfg.round_deadline_s,
            model=self.cfg.model.size,
            codec=self.codec.name,
            aggregate_codec=self.aggregate_codec.name,
            density=self.master.density,
            leaderboard=await asyncio.to_thread(leaderboard, self.ledger),
            ledger_head=head_event(self.ledger.head()),
            standby_of=None if self.primary is None else fingerprint(self.primary),
        )

    async def _stand_by(self, node: Node) -> bool:
        """Follow the primary (standby.py) until it goes, then take the shard over: True; False when the run ended."""
        assert self.primary is not None
        standby = Standby(
            self.cfg,
            node=node,
            own_key=self.identity.public_key,
            primary=self.primary,
            master=self.master,
            failover_after_s=self.options.failover_after_s,
            on_state=self._followed,
            on_event=self.on_event,
        )
        taken = await standby.follow()
        if taken is None:
            self.keeper.finished = True
            return False
        self.keeper.take_over(taken.master, set(taken.contributors))
        self.options = dataclasses.replace(self.options, wait_for_peers=0)  # the run is under way
        self._all_here.set()
        logger.warning("primary %s is gone; taking over at round %d", fingerprint(self.primary), self.master.round)
        self.on_event(
            Takeover(
                round=self.master.round,
                primary=fingerprint(self.primary),
                state_sha256=state_sha256(self.master.params).hex(),
                expected=len(taken.contributors),
            )
        )
        return True

    async def _followed(self, master: MasterState, aggregate: bytes | None) -> None:
        """A standby's new copy of the shard: checkpointed first, then current, with the aggregate that made it.

        It then tells joiners it holds that version (holder_records.py), so they may fetch chunks here.
        """
        await asyncio.to_thread(self.keeper.checkpoint, master, aggregate)
        self.keeper.followed(master, aggregate)
        assert self.node is not None
        await self.announcer.announce_holding(
            self.node,
            peer_id=self.peer_id,
            maddrs=self.maddrs,
            shard=self.shard,
            version=master.version,
            made_by=aggregate,
        )

    def _write_multiaddr_file(self) -> None:
        path = self.options.multiaddr_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(m + "\n" for m in self.maddrs))
        os.replace(tmp, path)  # readers never see a half-written list

    def _done(self) -> bool:
        limit = self.options.max_rounds
        return self.master.round >= self.cfg.rounds or (limit is not None and self.rounds_closed >= limit)

    async def _round_loop(self) -> None:
        while not self._done():
            reason = self.current.close_reason()
            if reason is not None and self._waiting_for_peers():
                # up to FIRST_ROUND_WAIT deadlines: peers starting on a loaded machine may take longer than
                # one, but one that never comes must not stall the run
                patience_s = (FIRST_ROUND_WAIT - 1) * self.cfg.round_deadline_s
                if reason != "deadline" or self.current.seconds_left() > -patience_s:
                    reason = None
            if self._close_requested and self.current.accepted:
                reason = "admin"
            if reason is None:
                if self.current.seconds_left() <= 0 and not self.current.accepted:
                    logger.info(
                        "round %d: no update by the deadline; waiting another %.0f s",
                        self.current.index,
                        self.cfg.round_deadline_s,
                    )
                    self.current.extend()
                self._wake.clear()
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, min(self.current.seconds_left(), 1.0)))
                continue
            await self.close(reason)
        self.keeper.finished = True

    async def close(self, reason: str) -> None:
        """Close the open round now, as the round loop does: the keeper records and checkpoints it (under the
        lock, in a worker thread); then its aggregate is published and the round reported."""
        async with self.lock:
            self._loop = asyncio.get_running_loop()
            closed = await asyncio.to_thread(self.keeper.close, reason)
            if isinstance(closed, Deferred):
                await asyncio.sleep(closed.retry_after_s)  # after a failed write; nothing changed meanwhile
                return
            self._close_requested = False
        async with self._published:
            self._published.notify_all()
        if not self._done():
            self._round_opened()
        val_loss = await asyncio.to_thread(self.keeper.evaluate, closed.master.params)
        self.on_event(round_event(closed, val_loss=val_loss, bytes_in=self.bytes_in, bytes_out=self.bytes_out))

    def _waiting_for_peers(self) -> bool:
        """Whether the first round still waits for `wait_for_peers` peers to join (see ServerOptions)."""
        return self.rounds_closed == 0 and len(self.current.arrived) < self.options.wait_for_peers

    def _round_opened(self) -> None:
        self.on_event(
            RoundOpened(round=self.current.index, deadline_s=max(0.0, self.current.seconds_left()), time_s=time.time())
        )

    async def _linger(self) -> None:
        """Serve the last round until its contributors have fetched the aggregate and their receipts, or for linger_s.

        A peer asks for its receipt only once the aggregate has reached it, so the receipts are what tell
        that the aggregate arrived: a finished write only means p2pd has the bytes, and stopping p2pd then
        can cut them off. The last receipt gets LINGER_DRAIN_S to leave the same way.
        """
        last = self.master.round - 1
        waited_for = len(self.current.expected)
        closed = self.keeper.closed.get(last)
        credited = 0 if closed is None else len(closed.credited)  # each asks for its receipt
        deadline = time.monotonic() + self.options.linger_s
        while time.monotonic() < deadline and (
            self.fetches.get(last, 0) < waited_for or self.receipts_served.get(last, 0) < credited
        ):
            self._wake.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
        await asyncio.sleep(min(LINGER_DRAIN_S, max(deadline - time.monotonic(), 0)))

    # ----------------------------------------------------------------- what the handlers ask for

    async def admit(self, body: bytes) -> bytes:
        """A state or manifest request's asker, expected in the open round; it may first wait for the others."""
        key, client_mode = parse_state_request_mode(body)
        if self.finished:
            raise Refusal(
                RefusalCode.RUN_FINISHED, f"run {self.cfg.run_name!r} has finished at round {self.master.round}"
            )
        standby = public_key_to_hex(key) in self.cfg.aggregator_keys  # follows the run: not a peer to wait for
        async with self.lock:  # not mid-close: a joiner gets the state of the round it will be waited for in
            if not standby and self.keeper.join(key, wait_for_peers=self.options.wait_for_peers):
                self._all_here.set()
        if self._waiting_for_peers() and not standby:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._all_here.wait(), timeout=max(self.cfg.round_deadline_s, JOIN_BARRIER_S))
        self.on_event(
            Joined(
                fingerprint=fingerprint(key),
                round=self.current.index,
                client_mode=client_mode,  # as the peer says: unauthenticated, shown on the status page only
                time_s=time.time(),
            )
        )
        return key

    async def published(self, round_index: int, *, timeout_s: float) -> bool:
        """Wait until round `round_index` has closed and its aggregate is published; False after `timeout_s`."""
        async with self._published:
            try:
                await asyncio.wait_for(self._published.wait_for(lambda: self.master.round > round_index), timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                return False
        return True

    async def find_chunk_payload(self, request: ChunkRequest) -> bytes:
        """The payload a chunk request names, if it is one of the KEPT_STATES last versions served.

        A standby builds its current version on the first request: joiners find it by its holder record.
        """
        if self.primary is not None and request.version == self.master.version:
            async with self.lock:
                await self.served_state()
        return self._served.payload(request)

    def _chunk_sent(self, n: int) -> None:
        self.bytes_out += n

    async def served_state(self) -> ServedState:
        """The current master version ready to serve, built once per version; the last KEPT_STATES are kept."""
        return await self._served.current(self.master)

    # ----------------------------------------------------------------- admin (the status page's, with a token)

    async def ban(self, public_key: bytes, *, reason: str, issuer: bytes | None = None) -> None:
        """Ban a key now (persisted with the strikes); its updates are refused from the next upload on.

        `issuer`: the run's other aggregator the ban was learned from (None: this one's own).
        """
        async with self.lock:
            round_index = self.keeper.ban(public_key, reason=reason, issuer=issuer)
        await asyncio.to_thread(self.reputation.flush)  # on disk before this returns (and the operator is told)
        self.on_event(Banned(fingerprint=fingerprint(public_key), round=round_index, reason=reason))
        self._wake.set()

    async def _ban_run_wide(self, public_key: bytes, reason: str, issuer: bytes) -> None:
        await self.ban(public_key, reason=reason, issuer=issuer)

    async def unban(self, public_key: bytes) -> bool:
        """Lift a key's ban; False if it was not banned."""
        async with self.lock:
            lifted = self.reputation.lift(public_key)
        await asyncio.to_thread(self.reputation.flush)
        if lifted:
            self.on_event(Unbanned(fingerprint=fingerprint(public_key)))
        return lifted

    def known_keys(self) -> set[bytes]:
        """Every peer key this run has seen: banned, struck, waited for, contributing, or in the ledger."""
        return self.keeper.known_keys()

    async def close_round_now(self) -> int:
        """Close the open round as soon as it has an accepted update; ValueError while it has none."""
        if not self.current.accepted or self.finished:
            raise ValueError(f"round {self.current.index} has no accepted update yet; there is nothing to close")
        self._close_requested = True
        self._wake.set()
        return self.current.index
