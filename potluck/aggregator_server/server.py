"""The aggregator server: a DHT bootstrap node that collects signed updates, closes rounds and serves state.

One asyncio loop runs everything: hivemind's DHT node (whose libp2p daemon carries the streams),
three stream handlers (`potluck.state`, `potluck.submit`, `potluck.aggregate`; see
protocol/messages.py), the DHT announcement, and the round loop. Heavy arithmetic (decoding,
aggregating, checkpointing, evaluating) runs in worker threads so the handlers stay responsive.

Aggregates are delivered by long-poll: a peer asks for round r's aggregate and the reply comes when
round r closes. The last few aggregates stay in memory (the last one also in the checkpoint), so a
peer that asks a little late still gets it; one that asks too late downloads the state again.

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potluck.aggregator_server.accounting import (
    HISTORY_ROUNDS,
    final_receipt,
    head_event,
    open_ledger,
    refused_entry,
    round_entries,
)
from potluck.aggregator_server.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_spool,
    prune_spool,
    save_checkpoint,
    spool_update,
)
from potluck.aggregator_server.judge import judge_round
from potluck.aggregator_server.master import (
    Contribution,
    MasterState,
    close_round,
    initial_master,
    token_cap,
)
from potluck.aggregator_server.next_density import UploadTiming, next_density
from potluck.aggregator_server.probe_handler import PROBE_HANDLER, handle_probe
from potluck.aggregator_server.reputation import BanFileError, Reputation
from potluck.aggregator_server.rounds import Accepted, OpenRound
from potluck.aggregator_server.served_state import KEPT_STATES, ServedState, serve_state
from potluck.aggregator_server.setup import SetupError
from potluck.aggregator_server.standby import Standby
from potluck.aggregator_server.validation import (
    Rejection,
    RoundContext,
    check_envelope,
    check_signature,
    decode_update,
)
from potluck.errors import PotluckError
from potluck.events import (
    AcceptedUpdate,
    AggregatorDone,
    AggregatorReady,
    Banned,
    Credit,
    Event,
    Joined,
    RoundClosed,
    RoundError,
    RoundOpened,
    Standing,
    Takeover,
    Unbanned,
    UpdateReceived,
    UpdateRejected,
)
from potluck.incentives.ledger import LedgerError
from potluck.incentives.ledger_format import LedgerRow, SignedHead
from potluck.protocol.ban_records import BANS_KEY, BanList, BanRecordError, parse_ban_lists, sign_ban_list
from potluck.protocol.chunk_server import AGGREGATOR_CHUNK_STREAMS, ChunkUnavailable, Pacer, chunk_handler
from potluck.protocol.codecs import Codec
from potluck.protocol.config import RunConfig
from potluck.protocol.density import density_ladder, density_problem, round_codecs, start_density
from potluck.protocol.dht_schema import AGGREGATORS_KEY, MAX_MADDRS, AggregatorAnnouncement, sign_announcement
from potluck.protocol.envelope import (
    MAX_UPDATE_ENVELOPE_BYTES,
    EnvelopeError,
    Receipt,
    SignedUpdate,
    sign_receipt,
)
from potluck.protocol.holder_records import HolderRecord, store_holder_record
from potluck.protocol.identity import Identity, fingerprint, public_key_from_hex, public_key_to_hex
from potluck.protocol.messages import (
    AGGREGATE_HANDLER,
    BUSY_PREFIX,
    CHUNK_HANDLER,
    MANIFEST_HANDLER,
    MAX_REQUEST_BYTES,
    RECEIPT_HANDLER,
    STATE_HANDLER,
    SUBMIT_HANDLER,
    MessageError,
    pack_envelope,
    parse_aggregate_request,
    parse_receipt_request,
    parse_state_request_mode,
    unpack_envelope,
)
from potluck.protocol.node import Node, start_node
from potluck.protocol.shards import ShardError, keys_of_shard, shard_names, shard_of_key
from potluck.protocol.state_chunks import ChunkRequest
from potluck.protocol.wire import (
    MessageKind,
    RefusalCode,
    VersionMismatchError,
    WireError,
    error_body,
    read_frame_from_stream,
    write_frame,
)
from potluck.training.data import load_corpus, val_batches
from potluck.training.diloco import load_params, state_sha256
from potluck.training.evaluate import evaluate
from potluck.training.models import build_model, model_config, parameter_shapes

logger = logging.getLogger(__name__)

KEPT_AGGREGATES = 8  # rounds whose aggregate a late peer can still fetch
READ_TIMEOUT_S = 60.0  # a peer that goes silent mid-request loses its stream after this
ANNOUNCE_TTL_S = 60.0
RUN_WIDE = "run-wide, "  # the reason's prefix of a ban learned from another aggregator of the run
MAX_UPLOADS = 32  # uploads read at once: bounds the memory hostile peers can pin (32 x max_update_bytes)
MAX_PROBES = 2  # concurrent doctor probes; more would let anyone eat the aggregator's bandwidth
LINGER_DRAIN_S = 1.0  # after the last reply is written, before p2pd stops: time for it to leave
JOIN_BARRIER_S = 60.0  # the longest a joiner of the first round waits for the others (see wait_for_peers)
FIRST_ROUND_WAIT = 3  # deadlines the first round may wait for --wait-for-peers before it closes anyway
LEADERBOARD_SIZE = 100  # peers listed in the ready event's leaderboard
LEDGER_FILE = "ledger.sqlite"


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


class AggregatorServer:
    """One aggregator process; `await serve()` runs it until the run or `max_rounds` is done."""

    def __init__(
        self, cfg: RunConfig, identity: Identity, options: ServerOptions, *, on_event: Callable[[Event], None]
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.options = options
        self.on_event = on_event
        self.cap = token_cap(cfg)
        model_shapes = parameter_shapes(model_config(cfg.model.size, block_size=cfg.model.block_size))
        try:  # the parameters this aggregator owns: all of them, or its shard's (protocol/shards.py)
            own = public_key_to_hex(identity.public_key)
            self.shard = 0 if cfg.shards == 1 else shard_of_key(cfg.aggregator_keys, own, cfg.shards)
            names = shard_names(model_shapes, cfg.shards)[self.shard]
        except ShardError as e:
            raise SetupError(f"run {cfg.run_name!r}: {e}") from e
        owners = keys_of_shard(cfg.aggregator_keys, self.shard, cfg.shards)
        # the key listed before this one for the same shard: the aggregator this one stands by for (None: owner)
        place = owners.index(own) if own in owners else 0
        self.primary = public_key_from_hex(owners[place - 1]) if place > 0 else None
        shapes = {name: model_shapes[name] for name in names}
        checkpoint = load_checkpoint(options.state_dir, config_hash=cfg.config_hash)
        self.aggregates: dict[int, bytes] = {}  # round -> AGGREGATE frame body
        if checkpoint is None:
            self.master = initial_master(cfg, names=names)
        else:
            if {n: tuple(t.shape) for n, t in checkpoint.params.items()} != shapes:
                raise CheckpointError(
                    f"the checkpoint in {options.state_dir} does not fit the run's model; use another --state-dir"
                )
            self.master = MasterState(
                round=checkpoint.round,
                version=checkpoint.version,
                params={name: checkpoint.params[name] for name in shapes},  # the model's order, not sorted
                outer_state=checkpoint.outer_state,
                residual=checkpoint.residual,
                density=start_density(cfg) if checkpoint.density is None else checkpoint.density,
            )
            problem = density_problem(cfg, self.master.density)
            if problem is not None:
                raise CheckpointError(f"the checkpoint in {options.state_dir} is for another run: {problem}")
            if checkpoint.last_aggregate is not None:
                self.aggregates[checkpoint.round - 1] = checkpoint.last_aggregate
        if self.master.round >= cfg.rounds:
            raise SetupError(
                f"run {cfg.run_name!r} in {options.state_dir} already finished ({cfg.rounds} rounds); "
                "use another --state-dir to start a new run"
            )
        self.resumed = checkpoint is not None
        self.codec, self.aggregate_codec = round_codecs(cfg, self.master.density)  # the open round's
        # the round before's upload codec, for its late updates; after a restart, the open round's (a late
        # update spooled before the restart at another density is skipped when it is restored)
        self._late_codec = self.codec
        self.ledger = open_ledger(options.state_dir / LEDGER_FILE, identity=identity, round_index=self.master.round)
        self.current = OpenRound(
            index=self.master.round, deadline_s=cfg.round_deadline_s, target_tokens=cfg.target_tokens_per_round
        )
        self.rounds_closed = 0
        self.finished = False
        self.fetches: dict[int, int] = {}  # round -> aggregate downloads served
        self.receipts_served: dict[int, int] = {}  # round -> final receipts served
        # round -> {update digest: tokens credited} of recently closed rounds: a retried upload whose first
        # reply was lost gets its receipt again instead of a "round closed" rejection
        self.closed_digests: dict[int, dict[bytes, int]] = {}
        self.closed_nonces: dict[int, dict[bytes, bytes]] = {}  # round -> {nonce: digest} of its contributors
        self.closed_rows: dict[int, list[LedgerRow]] = {}  # ledger rows of recently closed rounds, for receipts
        self.bytes_in = 0  # request bodies received (uploads, mostly)
        self.bytes_out = 0  # reply bodies sent (state, aggregates, receipts)
        self.maddrs: list[str] = []
        self._close_requested = False  # an admin asked to close the open round now
        self._lock = asyncio.Lock()
        self._probes = asyncio.Semaphore(MAX_PROBES)
        self._uploads = asyncio.Semaphore(MAX_UPLOADS)
        self._published = asyncio.Condition()
        self._wake = asyncio.Event()
        self._all_here = asyncio.Event()  # the first round's wait_for_peers have all downloaded the state
        self._served: dict[bytes, ServedState] = {}  # payload sha256 -> a recent version, built on demand
        # A shard's aggregator holds part of the model: it cannot score the held-out loss (peers can, see
        # PeerOptions.eval_batches), so its rounds skip the held-out check and report no loss, and it loads
        # neither the held-out batches nor a model to score them with.
        self.scores = cfg.shards == 1
        self.val_set: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.eval_model: torch.nn.Module | None = None
        if self.scores:
            model_cfg = model_config(cfg.model.size, block_size=cfg.model.block_size)
            corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, max_bytes=cfg.data.max_bytes)
            self.val_set = val_batches(
                corpus.val,
                batch_size=cfg.inner.batch_size,
                block_size=model_cfg.block_size,
                num_batches=options.eval_batches,
            )
            self.eval_model = build_model(model_cfg, seed=cfg.seed)
        self.reputation = Reputation.open(
            options.state_dir,
            ban_after=cfg.validation.ban_after_rejections,
            window_rounds=cfg.validation.ban_window_rounds,
        )
        self._restore_spool()

    # ----------------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        """Start the node, serve rounds until done, linger for late downloads, shut everything down."""
        node = await start_node(
            initial_peers=self.options.initial_peers,
            host_maddrs=self.options.host_maddrs,
            announce_maddrs=self.options.announce_maddrs,
            identity_path=self.options.state_dir / "libp2p.key",
            signer=self.identity,
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
                    self._find_chunk_payload,
                    on_served=self._chunk_sent,
                    max_streams=AGGREGATOR_CHUNK_STREAMS,
                    pacer=None if cap is None else Pacer(cap),
                ),
            )
            if self.primary is None:
                await self._add_handlers(p2p)
            self.maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
            self.peer_id = p2p.peer_id
            self._write_multiaddr_file()
            val_loss = await asyncio.to_thread(self._evaluate, self.master.params)
            self.on_event(
                AggregatorReady(
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
                    leaderboard=await asyncio.to_thread(self._leaderboard),
                    ledger_head=head_event(self.ledger.head()),
                    standby_of=None if self.primary is None else fingerprint(self.primary),
                )
            )
            if self.primary is not None:  # a standby serves nothing until it takes over
                if not await self._stand_by(node):
                    return  # the run ended under the primary
                await self._add_handlers(p2p)
            self.current.extend()  # the first deadline counts from now, not from loading the checkpoint
            self._round_opened()
            announcer = asyncio.create_task(self._announce_forever(node))
            await self._round_loop()
            await self._linger()
        finally:
            if announcer is not None:
                announcer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await announcer
            await node.shutdown()
            self.ledger.close()
        self.on_event(AggregatorDone(round=self.master.round, rounds_closed=self.rounds_closed))

    async def _add_handlers(self, p2p: Any) -> None:
        """Serve the protocol's requests (each through _closing: one ERROR line for what it refuses)."""
        for name, handler in (
            (STATE_HANDLER, self._handle_state),
            (MANIFEST_HANDLER, self._handle_manifest),
            (SUBMIT_HANDLER, self._handle_submit),
            (AGGREGATE_HANDLER, self._handle_aggregate),
            (PROBE_HANDLER, self._handle_probe),
            (RECEIPT_HANDLER, self._handle_receipt),
        ):
            await p2p.add_binary_stream_handler(name, _closing(name, handler))

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
            self.finished = True
            return False
        self.master = taken.master
        self.codec, self.aggregate_codec = round_codecs(self.cfg, self.master.density)
        self._late_codec = self.codec
        self.current = OpenRound(
            index=self.master.round,
            deadline_s=self.cfg.round_deadline_s,
            target_tokens=self.cfg.target_tokens_per_round,
            expected=set(taken.contributors),  # alive a round ago: wait for them, not for the first to arrive
        )
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
        await asyncio.to_thread(self._checkpoint, master, aggregate)
        self.master = master
        await self._announce_holding()
        if aggregate is not None:
            self.aggregates[master.round - 1] = aggregate
            for old in [r for r in self.aggregates if r <= master.round - 1 - KEPT_AGGREGATES]:
                del self.aggregates[old]

    async def _announce_holding(self) -> None:
        record = HolderRecord(
            holder=self.identity.public_key,
            libp2p_peer_id=self.node.p2p.peer_id.to_bytes(),
            maddrs=tuple(self.maddrs[:MAX_MADDRS]),
            config_hash=self.cfg.config_hash,
            shards=((self.shard, self.master.version),),
            timestamp_s=time.time(),
        )
        await store_holder_record(self.node.dht, record, self.identity, ttl_s=2 * self.cfg.round_deadline_s + 60)

    def _write_multiaddr_file(self) -> None:
        path = self.options.multiaddr_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(m + "\n" for m in self.maddrs))
        os.replace(tmp, path)  # readers never see a half-written list

    async def _announce_forever(self, node: Node) -> None:
        from hivemind.utils import get_dht_time

        while True:
            announcement = AggregatorAnnouncement(
                run_id=self.cfg.run_name,
                config_hash=self.cfg.config_hash,
                public_key=self.identity.public_key,
                libp2p_peer_id=self.peer_id.to_bytes(),
                maddrs=tuple(self.maddrs[:16]),
                round=self.master.round,
                timestamp_s=time.time(),
            )
            subkey, value = sign_announcement(announcement, self.identity)
            try:
                await node.dht.store(AGGREGATORS_KEY, value, get_dht_time() + ANNOUNCE_TTL_S, subkey=subkey)
                await self._share_bans(node)
            except (BanFileError, BanRecordError) as e:
                logger.error("run-wide bans not shared: %s", e)
            except Exception as e:  # the DHT may be alone (no other node yet): log, try again later
                logger.debug("DHT announcement failed: %s", e)
            await asyncio.sleep(self.options.announce_every_s)

    async def _share_bans(self, node: Node) -> None:
        """Publish the keys this aggregator banned (ban_records.py); ban the keys the run's other aggregators did.

        A ban learned this way says so in its reason, is not published again, and comes back while its
        issuer still lists it: lift it on the aggregator that banned it.
        """
        from hivemind.utils import get_dht_time

        own = tuple(
            (b.public_key, b.reason) for b in self.reputation.bans.values() if not b.reason.startswith(RUN_WIDE)
        )
        if own:
            ban_list = BanList(
                issuer=self.identity.public_key, config_hash=self.cfg.config_hash, bans=own, timestamp_s=time.time()
            )
            subkey, value = sign_ban_list(ban_list, self.identity)
            await node.dht.store(BANS_KEY, value, get_dht_time() + ANNOUNCE_TTL_S, subkey=subkey)
        others = frozenset(public_key_from_hex(k) for k in self.cfg.aggregator_keys) - {self.identity.public_key}
        if not others:
            return
        found = await node.dht.get(BANS_KEY, latest=True)
        for ban_list in parse_ban_lists(found, config_hash=self.cfg.config_hash, trusted=others):
            for key, reason in ban_list.bans:
                if not self.reputation.is_banned(key):
                    await self.ban(key, reason=f"{RUN_WIDE}by aggregator {fingerprint(ban_list.issuer)}: {reason}")

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
            await self._close(reason)
        self.finished = True

    async def _close(self, reason: str) -> None:
        async with self._lock:
            started = time.perf_counter()
            closing = self.current
            head = self.ledger.head()
            if head is None or head.round != closing.index:
                head = await self._judge_and_record(closing)
                if head is None:
                    return
            else:
                logger.info("round %d: already in the ledger; closing it as recorded", closing.index)
            rows = await asyncio.to_thread(self.ledger.rows, round_index=closing.index)
            kept = {r.entry.update_digest: r for r in rows if r.entry.accepted}
            for key, a in list(closing.accepted.items()):
                if a.update.header.digest() not in kept:  # dropped by the round's checks (before a restart)
                    del closing.accepted[key]
            contributions = [
                Contribution(
                    public_key=key,
                    decoded=a.decoded,
                    tokens=int(kept[a.update.header.digest()].entry.weight),
                    update_digest=a.update.header.digest(),
                )
                for key, a in sorted(closing.accepted.items())
            ]
            if len(contributions) != len(kept):
                raise SetupError(
                    f"round {closing.index} is in the ledger with {len(kept)} accepted update(s) but only "
                    f"{len(contributions)} are spooled in {self.options.state_dir}; the state dir is damaged"
                )
            timings = [
                UploadTiming(payload_bytes=len(a.payload), upload_s=a.upload_s, cycle_s=a.cycle_s)
                for a in closing.accepted.values()
                if a.discount == 1 and a.upload_s > 0
            ]
            density = next_density(self.master.density, timings, ladder=density_ladder(self.cfg))
            try:
                following, signed, payload = await asyncio.to_thread(
                    close_round,
                    self.master,
                    contributions,
                    cfg=self.cfg,
                    identity=self.identity,
                    aggregate_codec=self.aggregate_codec,
                    ledger_head=head.head_hash,
                    next_density=density,
                )
                body = pack_envelope(signed.to_bytes(), payload)
                await asyncio.to_thread(self._checkpoint, following, body)
            except CheckpointError as e:  # the ledger has the round: the retry closes it as recorded
                logger.error("round %d not closed: %s; retrying in 5 s", closing.index, e)
                self.on_event(RoundError(round=closing.index, detail=str(e)))
                await asyncio.sleep(5)
                return
            aggregation_s = time.perf_counter() - started
            # Recorded and checkpointed: only now does the new state become visible to anyone.
            closed_density = self.master.density
            self.master = following
            self._late_codec = self.codec
            self.codec, self.aggregate_codec = round_codecs(self.cfg, following.density)
            self.aggregates[closing.index] = body
            self.closed_rows[closing.index] = rows
            for old in [r for r in self.aggregates if r <= closing.index - KEPT_AGGREGATES]:
                del self.aggregates[old]
            credited = dict(signed.header.contributors)
            self.closed_digests[closing.index] = {
                a.update.header.digest(): credited[key] for key, a in closing.accepted.items()
            }
            self.closed_nonces[closing.index] = {
                a.update.header.nonce: a.update.header.digest() for a in closing.accepted.values()
            }
            for old in [r for r in self.closed_digests if r <= closing.index - KEPT_AGGREGATES]:
                del self.closed_digests[old]
                self.closed_nonces.pop(old, None)
                self.closed_rows.pop(old, None)
            self.current = closing.successor()
            self._close_requested = False
            self.rounds_closed += 1
            with contextlib.suppress(OSError):
                prune_spool(self.options.state_dir, before_round=following.round)
        async with self._published:
            self._published.notify_all()
        if not self._done():
            self._round_opened()
        val_loss = await asyncio.to_thread(self._evaluate, following.params)
        self.on_event(
            RoundClosed(
                round=closing.index,
                closed_by=reason,
                val_loss=val_loss,
                accepted=tuple(
                    AcceptedUpdate(
                        fingerprint=fingerprint(key),
                        tokens=a.update.header.tokens,
                        bytes=len(a.payload),
                        update=a.update.header.digest().hex()[:16],
                        credit=kept[a.update.header.digest()].entry.credit,
                    )
                    for key, a in sorted(closing.accepted.items())
                ),
                rejected=closing.rejected,
                density=closed_density,  # the round's upload density, and the next one's
                next_density=following.density,
                round_s=time.monotonic() - closing.opened_at,
                aggregation_s=aggregation_s,
                aggregate_bytes=len(body),
                state_sha256=signed.header.state_sha256.hex(),
                tokens=closing.tokens,
                time_s=time.time(),
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                ledger_head=head_event(head),
                credits=tuple(
                    Credit(
                        fingerprint=fingerprint(r.entry.peer_public_key),
                        public_key=r.entry.peer_public_key.hex(),
                        credit=r.entry.credit,
                    )
                    for r in kept.values()
                ),
            )
        )

    def _waiting_for_peers(self) -> bool:
        """Whether the first round still waits for `wait_for_peers` peers to join (see ServerOptions)."""
        return self.rounds_closed == 0 and len(self.current.expected) < self.options.wait_for_peers

    async def _judge_and_record(self, closing: OpenRound) -> SignedHead | None:
        """Judge the closing round and commit its ledger rows; None if it cannot close yet (nothing kept, or
        the ledger write failed: nothing of the round changed then, the next attempt starts over)."""
        entries = sorted(closing.accepted.items())
        verdict = await asyncio.to_thread(
            judge_round,
            [a.decoded for _, a in entries],
            [a.claim for _, a in entries],
            cfg=self.cfg,
            token_cap=self.cap,
            held_out_loss=self._held_out_loss if self.scores else None,
        )
        head = None
        if verdict.kept:
            judged = await asyncio.to_thread(  # reads each kept peer's history from the ledger
                round_entries,
                [a for _, a in entries],
                verdict,
                token_cap=self.cap,
                history=lambda key: self.ledger.recent_weights(key, limit=HISTORY_ROUNDS),
            )
            rows = sorted([*closing.refused, *judged], key=lambda e: e.time_s)  # in the order they arrived
            try:
                head = await asyncio.to_thread(
                    self.ledger.append_round, round_index=closing.index, entries=rows, identity=self.identity
                )
            except LedgerError as e:
                logger.error("round %d not closed: %s; retrying in 5 s", closing.index, e)
                self.on_event(RoundError(round=closing.index, detail=str(e)))
                await asyncio.sleep(5)
                return None
        for i, rejection in sorted(verdict.rejections.items()):
            key, a = entries[i]
            del closing.accepted[key]  # it does not count; the aggregate's contributor list says so
            closing.rejected += 1
            self._record_rejection(key, closing.index, rejection, a.update)
            if head is None:  # the round stays open: its row waits with the arrival refusals
                closing.refuse(
                    refused_entry(a.update, payload_bytes=len(a.payload), rejection=rejection, received_s=a.received_s)
                )
            if not self.reputation.is_banned(key):
                closing.expect(key, late=True)  # alive: the next round still waits for it
        if head is None and not verdict.kept:
            logger.warning("round %d: every update was dropped at close; waiting another deadline", closing.index)
            closing.extend()
        return head

    def _round_opened(self) -> None:
        self.on_event(
            RoundOpened(round=self.current.index, deadline_s=max(0.0, self.current.seconds_left()), time_s=time.time())
        )

    def _leaderboard(self) -> tuple[Standing, ...]:
        """The ledger's top peers by points, for the ready event (the status page goes on from there)."""
        points, accepted = self.ledger.points(), self.ledger.accepted_counts()
        return tuple(
            Standing(fingerprint=fingerprint(key), public_key=key.hex(), points=total, accepted=accepted.get(key, 0))
            for key, total in list(points.items())[:LEADERBOARD_SIZE]
        )

    def _checkpoint(self, state: MasterState, aggregate_body: bytes | None) -> None:
        save_checkpoint(
            self.options.state_dir,
            Checkpoint(
                round=state.round,
                version=state.version,
                params=state.params,
                outer_state=state.outer_state,
                residual=state.residual,
                last_aggregate=aggregate_body,
                config_hash=self.cfg.config_hash,
                density=state.density,
            ),
        )

    async def _linger(self) -> None:
        """Serve the last round until its contributors have fetched the aggregate and their receipts, or for linger_s.

        A peer asks for its receipt only once the aggregate has reached it, so the receipts are what tell
        that the aggregate arrived: a finished write only means p2pd has the bytes, and stopping p2pd then
        can cut them off. The last receipt gets LINGER_DRAIN_S to leave the same way.
        """
        last = self.master.round - 1
        waited_for = len(self.current.expected)
        credited = len(self.closed_digests.get(last, {}))  # each asks for its receipt
        deadline = time.monotonic() + self.options.linger_s
        while time.monotonic() < deadline and (
            self.fetches.get(last, 0) < waited_for or self.receipts_served.get(last, 0) < credited
        ):
            self._wake.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
        await asyncio.sleep(min(LINGER_DRAIN_S, max(deadline - time.monotonic(), 0)))

    def _held_out_loss(self, delta: Mapping[str, torch.Tensor] | None) -> float:
        """The held-out check's score: the base with `delta` applied alone (outer lr), on the check batches."""
        lr = self.cfg.outer.lr
        params = self.master.params if delta is None else {n: p - lr * delta[n] for n, p in self.master.params.items()}
        loss = self._evaluate(params, batches=self.cfg.validation.held_out_batches)
        assert loss is not None  # only called when this aggregator scores (self.scores)
        return loss

    def _evaluate(self, params: dict[str, torch.Tensor], *, batches: int | None = None) -> float | None:
        """Held-out loss of `params` on the first `batches` held-out batches (all of them by default).

        None for a shard's aggregator, which holds part of the model only.
        """
        if self.eval_model is None:
            return None
        load_params(self.eval_model, params)
        return evaluate(self.eval_model, self.val_set[:batches], device="cpu")

    # ----------------------------------------------------------------- restart

    def _restore_spool(self) -> None:
        max_bytes = MAX_UPDATE_ENVELOPE_BYTES + self.cfg.max_update_bytes
        restored = 0
        for envelope, payload in load_spool(self.options.state_dir, round=self.master.round, max_bytes=max_bytes):
            try:
                update = SignedUpdate.from_bytes(envelope)
            except EnvelopeError as e:
                logger.warning("skipping a spooled update: %s", e)
                continue
            # accepted before the crash: however long the aggregator was down, they were fresh then
            rejection = check_envelope(update, payload, self._context(check_clock=False))
            late = rejection is not None and self._takes_late(update)
            if late:
                rejection = check_envelope(update, payload, self._context(check_clock=False, late=True))
            decoded = None
            if rejection is None:
                decoded, rejection = decode_update(payload, codec=self._upload_codec(late), spec=self.master.spec)
            if rejection is not None or decoded is None:
                logger.warning("skipping a spooled update: %s", rejection)
                continue
            self._accept(update, envelope, payload, decoded, late=late)
            restored += 1
        if restored:
            logger.info("round %d: restored %d accepted update(s) from the spool", self.master.round, restored)

    # ----------------------------------------------------------------- handlers

    def _upload_codec(self, late: bool) -> Codec:
        """The codec an upload for the open round (or, `late`, for the round before) was encoded with."""
        return self._late_codec if late else self.codec

    def _takes_late(self, update: SignedUpdate) -> bool:
        """Whether the run accepts this update, refused for its round, as a late one into the open round."""
        h = update.header
        held = self.current.accepted.get(h.peer_public_key)
        return (
            self.cfg.late_updates == "discount"
            and h.round == self.current.index - 1
            and (held is None or held.update.header.digest() == h.digest())  # free, or this one again (a retry)
        )

    def _context(self, *, check_clock: bool = True, late: bool = False) -> RoundContext:
        """What an update for the open round is checked against; `late`: one for the round before it."""
        return RoundContext(
            run_id=self.cfg.run_name,
            config_hash=self.cfg.config_hash,
            round=self.current.index - late,
            version=self.master.version - late,
            codec=self.codec.name,
            max_update_bytes=self.cfg.max_update_bytes,
            accepted_digests={k: a.update.header.digest() for k, a in self.current.accepted.items()},
            now_s=time.time(),
            timestamp_window_s=self.cfg.validation.timestamp_window_s if check_clock else float("inf"),
            seen_nonces={
                **{n: d for nonces in self.closed_nonces.values() for n, d in nonces.items()},
                **{a.update.header.nonce: a.update.header.digest() for a in self.current.accepted.values()},
            },
            round_payloads={a.update.header.payload_sha256: k for k, a in self.current.accepted.items()},
            late_slots={k: a.update.header.round for k, a in self.current.accepted.items() if a.discount < 1},
        )

    def _accept(
        self,
        update: SignedUpdate,
        envelope: bytes,
        payload: bytes,
        decoded: dict[str, torch.Tensor],
        *,
        late: bool = False,
        upload_s: float = 0.0,
        cycle_s: float = 0.0,
    ) -> int:
        key = update.header.peer_public_key
        discount = self.cfg.late_discount if late else 1.0
        weight = int(min(update.header.tokens, self.cap) * discount)
        self.current.accepted[key] = Accepted(
            update=update,
            envelope=envelope,
            payload=payload,
            decoded=decoded,
            weight=float(weight),
            discount=discount,
            upload_s=upload_s,
            cycle_s=cycle_s,
        )
        self.current.expected.add(key)
        return weight

    def _record_rejection(
        self, public_key: bytes, round_index: int, rejection: Rejection, update: SignedUpdate | None = None
    ) -> None:
        """Log a rejection and report it (status line, swarm, and later the ledger)."""
        who = fingerprint(public_key)
        logger.warning("rejected update from %s for round %d: %s", who, round_index, rejection)
        self.on_event(
            UpdateRejected(
                fingerprint=who,
                round=round_index,
                check=rejection.check,
                reason=str(rejection),
                update=None if update is None else update.header.digest().hex()[:16],
            )
        )
        try:
            ban = self.reputation.strike(public_key, round_index=self.current.index, check=rejection.check)
        except BanFileError as e:
            logger.error("could not record a strike: %s", e)
            return
        if ban is not None:
            self.on_event(Banned(fingerprint=who, round=ban.round, reason=ban.reason))

    async def _handle_probe(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The doctor's rate probe, at most MAX_PROBES at a time: each may cost 8 MiB each way."""
        if self._probes.locked():
            raise _Refusal(
                RefusalCode.BUSY, f"{BUSY_PREFIX}measuring other peers' links; try potluck doctor again in a minute"
            )
        async with self._probes:
            await handle_probe(info, reader, writer)

    async def _admit(self, body: bytes) -> bytes:
        """A state or manifest request's asker, expected in the open round; it may first wait for the others."""
        key, client_mode = parse_state_request_mode(body)
        if self.finished:
            raise _Refusal(
                RefusalCode.RUN_FINISHED, f"run {self.cfg.run_name!r} has finished at round {self.master.round}"
            )
        standby = public_key_to_hex(key) in self.cfg.aggregator_keys  # follows the run: not a peer to wait for
        async with self._lock:  # not mid-close: a joiner gets the state of the round it will be waited for in
            if key not in self.current.accepted and not standby:
                self.current.expect(key, late=False)
                wanted = self.options.wait_for_peers
                if wanted and self.rounds_closed == 0 and len(self.current.expected) == wanted:
                    self.current.extend()  # everyone the first round waited for is here: give them a full deadline
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

    async def _handle_state(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The whole state in one reply (standbys follow this way; joiners use the manifest and chunks)."""
        _, body = await _read(reader, MessageKind.STATE_REQUEST, MAX_REQUEST_BYTES)
        await self._admit(body)
        async with self._lock:
            reply = (await self._served_state()).state_body()
        self.bytes_out += len(reply)
        await write_frame(writer, kind=MessageKind.STATE, body=reply)

    async def _handle_manifest(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The signed state header and its chunk digests: a joiner then fetches the chunks from every holder."""
        _, body = await _read(reader, MessageKind.MANIFEST_REQUEST, MAX_REQUEST_BYTES)
        await self._admit(body)
        async with self._lock:
            reply = (await self._served_state()).manifest_body()
        self.bytes_out += len(reply)
        await write_frame(writer, kind=MessageKind.MANIFEST, body=reply)

    async def _find_chunk_payload(self, request: ChunkRequest) -> bytes:
        """The payload a chunk request names, if it is one of the KEPT_STATES last versions served.

        A standby builds its current version on the first request: joiners find it by its holder record.
        """
        if self.primary is not None and request.version == self.master.version:
            async with self._lock:
                await self._served_state()
        served = self._served.get(request.payload_sha256)
        if served is None or request.shard != self.shard or served.version != request.version:
            raise ChunkUnavailable(f"this aggregator does not serve shard {request.shard} v{request.version} now")
        return served.payload

    def _chunk_sent(self, n: int) -> None:
        self.bytes_out += n

    async def _served_state(self) -> ServedState:
        """The current master version ready to serve, built once per version; the last KEPT_STATES are kept."""
        master = self.master
        newest = next(reversed(self._served.values()), None)
        if newest is not None and newest.version == master.version:
            return newest
        served = await asyncio.to_thread(serve_state, self.cfg, master, self.identity, shard=self.shard)
        self._served[served.payload_sha256] = served
        while len(self._served) > KEPT_STATES:
            del self._served[next(iter(self._served))]
        return served

    async def _handle_submit(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limit = 4 + MAX_UPDATE_ENVELOPE_BYTES + self.cfg.max_update_bytes
        if self._uploads.locked():
            raise _Refusal(
                RefusalCode.BUSY, f"{BUSY_PREFIX}{MAX_UPLOADS} uploads are already in progress; retry in a few seconds"
            )
        async with self._uploads:  # each upload may hold max_update_bytes in memory until it is judged
            reading = time.monotonic()
            _, body = await _read(reader, MessageKind.SUBMIT, limit)
            arrived = time.monotonic()
        self.bytes_in += len(body)
        received_s = time.time()
        envelope, payload = unpack_envelope(body, max_envelope_bytes=MAX_UPDATE_ENVELOPE_BYTES)
        try:
            update = SignedUpdate.from_bytes(envelope)
        except EnvelopeError as e:
            raise _Refusal(RefusalCode.BAD_REQUEST, f"envelope: {e}") from e
        h = update.header
        async with self._lock:
            rejection: Rejection | None = None
            credited = 0
            earlier = self.closed_digests.get(h.round, {}).get(h.digest())
            if earlier is not None and check_signature(update, payload, self._context()) is not None:
                earlier = None  # not the update we accepted: judge it like any other
            self.reputation.reload_if_changed()
            repeated = self.current.answered.get(h.digest())
            if repeated is not None and check_signature(update, payload, self._context()) is not None:
                repeated = None  # not the update that was refused: judge it like any other
            if repeated is not None:  # refused before; the peer never saw the reply: the same answer, no new strike
                rejection = repeated
            elif self.reputation.is_banned(h.peer_public_key):  # first and cheap: no signature check, no decode
                who = fingerprint(h.peer_public_key)
                rejection = Rejection(check="banned", detail=f"{who} is banned from this run")
            elif earlier is not None:  # accepted before its round closed; the peer never saw the receipt
                credited = earlier
            elif self.finished:
                rejection = Rejection(check="finished", detail=f"the run has finished at round {self.master.round}")
            else:
                rejection = check_envelope(update, payload, self._context())
            late = rejection is not None and rejection.check == "round" and repeated is None
            late = late and self._takes_late(update)
            if late:
                rejection = check_envelope(update, payload, self._context(late=True))
            if earlier is None and rejection is None and not self.reputation.is_banned(h.peer_public_key):
                existing = self.current.accepted.get(h.peer_public_key)
                if existing is not None:  # the same update again: a retry after a lost reply
                    credited = int(existing.weight)
                else:
                    decoded, rejection = await asyncio.to_thread(
                        decode_update, payload, codec=self._upload_codec(late), spec=self.master.spec
                    )
                    if decoded is not None:
                        await asyncio.to_thread(
                            spool_update,
                            self.options.state_dir,
                            round=self.current.index,  # a late update is restored into the round it counts in
                            public_key=h.peer_public_key,
                            envelope=envelope,
                            payload=payload,
                        )
                        credited = self._accept(
                            update,
                            envelope,
                            payload,
                            decoded,
                            late=late,
                            upload_s=arrived - reading,
                            cycle_s=arrived - self.current.opened_at,
                        )
                        self._wake.set()
            self.on_event(
                UpdateReceived(
                    fingerprint=fingerprint(h.peer_public_key),
                    round=h.round,
                    tokens=h.tokens,
                    bytes=len(payload),
                    accepted=rejection is None,
                    check=None if rejection is None else rejection.check,
                    time_s=received_s,
                )
            )
            if rejection is not None and repeated is None:
                self.current.rejected += 1
                if rejection.check not in _UNATTRIBUTED:  # signed by its key: the ledger records it
                    entry = refused_entry(
                        update, payload_bytes=len(payload), rejection=rejection, received_s=received_s
                    )
                    self.current.refuse(entry)
                if rejection.check == "round" and h.round < self.current.index:
                    self.current.expect(h.peer_public_key, late=True)  # alive, just slow: wait for it next time
                elif rejection.check not in ("signature", "banned") and h.round == self.current.index:
                    self.current.reported.add(h.peer_public_key)  # it has had its say this round
                self._record_rejection(h.peer_public_key, h.round, rejection, update)
                if rejection.check not in _UNATTRIBUTED:
                    self.current.remember_refusal(h.digest(), rejection)
                if self.reputation.is_banned(h.peer_public_key):
                    self.current.expected.discard(h.peer_public_key)  # never wait for a banned key
                self._wake.set()
        receipt = Receipt(
            run_id=self.cfg.run_name,
            config_hash=self.cfg.config_hash,
            round=self.current.index if late and rejection is None else h.round,  # where a late one counts
            peer_public_key=h.peer_public_key,
            aggregator_public_key=self.identity.public_key,
            update_sha256=h.digest(),
            tokens_credited=credited,
            accepted=rejection is None,
            reason="" if rejection is None else _printable(str(rejection))[:500],
            timestamp_s=time.time(),
        )
        reply = sign_receipt(receipt, self.identity).to_bytes()
        self.bytes_out += len(reply)
        await write_frame(writer, kind=MessageKind.SUBMIT_REPLY, body=reply)

    async def _handle_aggregate(
        self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        _, body = await _read(reader, MessageKind.AGGREGATE_REQUEST, MAX_REQUEST_BYTES)
        wanted = parse_aggregate_request(body)
        if wanted > self.current.index:
            raise _Refusal(
                RefusalCode.NOT_STARTED, f"round {wanted} has not started; the open round is {self.current.index}"
            )
        if wanted == self.current.index and not self.finished:
            timeout_s = max(self.current.seconds_left(), 0) + self.cfg.round_deadline_s + 30
            async with self._published:
                try:
                    await asyncio.wait_for(self._published.wait_for(lambda: self.master.round > wanted), timeout_s)
                except (TimeoutError, asyncio.TimeoutError):
                    raise _Refusal(RefusalCode.ROUND_OPEN, f"round {wanted} is still open; ask again") from None
        aggregate = self.aggregates.get(wanted)
        if aggregate is None:
            raise _Refusal(
                RefusalCode.NOT_HELD,
                f"the aggregate of round {wanted} is no longer held (open round: {self.current.index}); "
                "download the state again",
            )
        self.bytes_out += len(aggregate)
        await write_frame(writer, kind=MessageKind.AGGREGATE, body=aggregate)
        self.fetches[wanted] = self.fetches.get(wanted, 0) + 1
        self._wake.set()

    async def _handle_receipt(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A closed round's final receipt for one update, built from its ledger rows (with the Merkle proof)."""
        _, body = await _read(reader, MessageKind.RECEIPT_REQUEST, MAX_REQUEST_BYTES)
        round_index, digest = parse_receipt_request(body)
        if round_index >= self.master.round:
            raise _Refusal(
                RefusalCode.ROUND_OPEN,
                f"round {round_index} has not closed yet (the open round is {self.current.index})",
            )
        rows = self.closed_rows.get(round_index)
        if rows is None:
            rows = await asyncio.to_thread(self.ledger.rows, round_index=round_index)
        signed = final_receipt(
            rows, digest, run_id=self.cfg.run_name, config_hash=self.cfg.config_hash, identity=self.identity
        )
        if signed is None:
            raise _Refusal(RefusalCode.NOT_FOUND, f"round {round_index}'s ledger has no update {digest.hex()[:16]}")
        reply = signed.to_bytes()
        self.bytes_out += len(reply)
        await write_frame(writer, kind=MessageKind.RECEIPT, body=reply)
        self.receipts_served[round_index] = self.receipts_served.get(round_index, 0) + 1
        self._wake.set()

    # ----------------------------------------------------------------- admin (the status page's, with a token)

    async def ban(self, public_key: bytes, *, reason: str) -> None:
        """Ban a key now (persisted with the strikes); its updates are refused from the next upload on."""
        async with self._lock:
            ban = self.reputation.ban(public_key, reason=reason)
            self.current.expected.discard(public_key)
        self.on_event(Banned(fingerprint=fingerprint(public_key), round=ban.round, reason=reason))
        self._wake.set()

    async def unban(self, public_key: bytes) -> bool:
        """Lift a key's ban; False if it was not banned."""
        async with self._lock:
            lifted = self.reputation.lift(public_key)
        if lifted:
            self.on_event(Unbanned(fingerprint=fingerprint(public_key)))
        return lifted

    def known_keys(self) -> set[bytes]:
        """Every peer key this run has seen: banned, struck, waited for, contributing, or in the ledger."""
        keys = set(self.reputation.bans) | set(self.reputation.strikes)
        keys |= self.current.expected | set(self.current.accepted) | set(self.ledger.points())
        return keys

    async def close_round_now(self) -> int:
        """Close the open round as soon as it has an accepted update; ValueError while it has none."""
        if not self.current.accepted or self.finished:
            raise ValueError(f"round {self.current.index} has no accepted update yet; there is nothing to close")
        self._close_requested = True
        self._wake.set()
        return self.current.index


# Rejections raised before the signature is known good: the ledger cannot say whose upload it was.
_UNATTRIBUTED = frozenset({"signature", "banned", "finished"})


class _Refusal(PotluckError):
    """A request this server refuses; the code and the message go back to the caller in an ERROR frame."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refusal_code(e: Exception) -> RefusalCode:
    """The code an ERROR frame carries for an exception `_closing` answers."""
    if isinstance(e, _Refusal):
        return e.code
    if isinstance(e, VersionMismatchError):
        return RefusalCode.VERSION_MISMATCH
    if isinstance(e, (WireError, MessageError)):
        return RefusalCode.BAD_REQUEST
    return RefusalCode.INTERNAL  # a checkpoint this server cannot read or write


async def _read(reader: asyncio.StreamReader, kind: MessageKind, max_body_bytes: int) -> tuple[MessageKind, bytes]:
    return await asyncio.wait_for(
        read_frame_from_stream(reader, max_body_bytes=max_body_bytes, expected_kinds={kind}), READ_TIMEOUT_S
    )


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


Handler = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _closing(name: str, handler: Handler) -> Handler:
    """Run a handler; answer refusals and malformed input with one ERROR line; always close the stream."""

    async def wrapped(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(info, reader, writer)
        except (_Refusal, WireError, MessageError, CheckpointError) as e:
            logger.info("%s from %s refused: %s", name, getattr(info, "peer_id", "?"), e)
            reply = e.reply() if isinstance(e, VersionMismatchError) else str(e)
            with contextlib.suppress(Exception):
                await write_frame(writer, kind=MessageKind.ERROR, body=error_body(reply, code=_refusal_code(e)))
        except (TimeoutError, asyncio.TimeoutError):
            logger.info("%s from %s timed out", name, getattr(info, "peer_id", "?"))
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("%s: connection lost: %s", name, e)
        except Exception:
            logger.exception("%s handler failed", name)
            with contextlib.suppress(Exception):
                body = error_body("internal error on the aggregator", code=RefusalCode.INTERNAL)
                await write_frame(writer, kind=MessageKind.ERROR, body=body)
        finally:
            writer.close()

    return wrapped
