"""The volunteer: join, find the run's aggregator, sync, then train / submit / apply, round after round.

DESIGN.md's "One round, as data" from the peer's side. The peer keeps the master state (parameters
and outer momentum) exactly as the aggregator does: it applies each signed aggregate with the same
outer step and compares the result's checksum with the one the aggregator signed; any difference
(or a gap it cannot fill) and it downloads the state again. It never trusts an aggregator key the
run's config does not list.

PeerRunner puts the peer's parts together: sync.py finds the aggregators and downloads the state
(retries, fail-over), loop.py runs the rounds, overlap.py paces the inner steps, serving.py gives
chunks of the state to joiners, final_receipts.py collects and checks what each round credited.
Network trouble is expected, not fatal: after `reconnect_timeout_s` without an answer the peer gives
up with one line.
"""

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from potluck.events import Event, Finished, PeerDone, PeerPlan
from potluck.peer.final_receipts import FinalReceipts
from potluck.peer.inner_state import StateWriter, load_state
from potluck.peer.loop import RoundLoop
from potluck.peer.options import PeerDiverged, PeerError, PeerOptions, RunFinished
from potluck.peer.records import HeldOutScore, Master, Tally
from potluck.peer.serving import StateServer
from potluck.peer.sync import Sync, UntrustedState
from potluck.peer.trainer import LocalTrainer, RoundWork
from potluck.planning.benchmark import measure_for_plan
from potluck.planning.plan import auto_plan
from potluck.protocol.backoff import backoff_s
from potluck.protocol.client import AggregatorLink
from potluck.protocol.config import RunConfig
from potluck.protocol.envelope import SignedUpdate, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity
from potluck.protocol.node import JoinError, Node, parse_join_address, start_node
from potluck.protocol.probe import ProbeUnavailableError, measure_rates
from potluck.protocol.wire import PeerRefusedError, WireError

__all__ = ["PeerDiverged", "PeerError", "PeerOptions", "PeerRunner", "RunFinished", "UntrustedState", "join_addresses"]

logger = logging.getLogger(__name__)

PLAN_PROBE_BYTES = 1024 * 1024  # each way: ~1 s at 10 Mbit/s, enough for a rate that means something
PLAN_PROBE_TIMEOUT_S = 30.0


def _own_nice() -> int | None:
    """This process's nice value (None where the platform has none): a swarm's summary shows it per peer."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):
        return None


class PeerRunner:
    """One volunteer process; `await run()` returns when max_rounds are done or the run has finished.

    `make_update`, `after_submit` and `make_trainer` are the places a red-team subclass changes what
    the peer does (potluck/lab/redteam/peer.py); a normal peer never imports that.
    """

    def __init__(self, identity: Identity, options: PeerOptions, *, on_event: Callable[[Event], None]) -> None:
        self.identity = identity
        self.options = options
        self.on_event = on_event
        self.join_addrs = [parse_join_address(a) for a in options.join]  # JoinError before anything starts
        self.tally = Tally()
        self.score = HeldOutScore(options.eval_batches)  # scores the master state (PeerOptions.eval_batches)
        self.final_receipts = FinalReceipts(
            identity, receipts_dir=options.receipts_dir, tally=self.tally, on_event=on_event
        )
        self.trainer: LocalTrainer | None = None  # made once the run's config is known
        self.sync: Sync | None = None  # the aggregators as seen through the DHT node, once it is up

    @property
    def link(self) -> AggregatorLink:
        """The link to the aggregator this peer synced from (a red-team subclass sends its extra uploads there)."""
        if self.sync is None or self.sync.link is None:
            raise PeerError("this peer has not found an aggregator yet")
        return self.sync.link

    async def run(self) -> None:
        """Join, sync and train until done; the DHT node and its daemon are shut down on every exit path."""
        node = await join_within(
            self.options.join_timeout_s,
            lambda timeout_s: start_node(
                initial_peers=self.join_addrs,
                host_maddrs=self.options.host_maddrs,
                client_mode=self.options.client_mode,
                signer=self.identity,  # signs its holder record (serve_state)
                bootstrap_timeout_s=timeout_s,
            ),
        )
        try:
            serving = StateServer(node, self.identity, self.options, tally=self.tally)
            await serving.start()
            sync = self.sync = Sync(
                node,
                self.identity,
                self.options,
                join_addrs=self.join_addrs,
                tally=self.tally,
                score=self.score,
                on_event=self.on_event,
            )
            await sync.retrying("finding the aggregator", sync.find_aggregator)
            master = await sync.retrying("downloading the state", sync.sync_from_any)
            if self.options.plan:
                await self._start_up_plan(master.cfg, sync.link)
            self.trainer = await asyncio.to_thread(self.make_trainer, master.cfg)
            writer = await self._inner_state(master)
            loop = RoundLoop(
                self,
                identity=self.identity,
                options=self.options,
                trainer=self.trainer,
                cfg=master.cfg,
                sync=sync,
                serving=serving,
                receipts=self.final_receipts,
                score=self.score,
                tally=self.tally,
                on_event=self.on_event,
                inner_state=writer,
            )
            try:
                await loop.run(master)
            finally:
                if writer is not None:
                    await writer.close()
        except RunFinished as e:
            self.on_event(Finished(detail=str(e)))
        finally:
            await node.shutdown()
        self.on_event(self.summary())

    async def _inner_state(self, master: Master) -> StateWriter | None:
        """Take back the optimizer state a restart left, if it is this run's; the writer that keeps it from now on."""
        path = self.options.inner_state_file
        if path is None or self.trainer is None:
            return None
        config = master.cfg.config_hash
        await asyncio.to_thread(load_state, path, self.trainer.optimizer, config_hash=config, round_index=master.round)
        return StateWriter(path, config_hash=config)

    async def _start_up_plan(self, cfg: RunConfig, link: AggregatorLink | None) -> None:
        """Measure this machine and link for the run and report what they predict (an event, one log line)."""
        assert link is not None  # the state came over it
        try:
            figures = await asyncio.to_thread(
                measure_for_plan, cfg, device=self.options.device, batch_size=self.options.batch_size
            )
            up, down = await measure_rates(
                link.p2p,
                link.peer_id,
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
        t = self.tally
        return PeerDone(
            fingerprint=self.identity.fingerprint,
            rounds=t.rounds_done,
            accepted=t.accepted,
            rejected=t.rejected,
            bytes_up=t.bytes_up,
            bytes_down=t.bytes_down,
            state_bytes_served=t.chunks_served_bytes,  # chunks of the state given to joiners (in bytes_up)
            receipts=t.receipts,
            score=t.score,
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
            "tokens": t.total_work,
            "inner_steps": t.total_steps,
            "compute_s": t.total_compute_s,
            "active_s": active_s,
            "compute_utilization": min(1.0, t.total_compute_s / active_s) if active_s > 0 else 1.0,
            **setup,
        }

    def make_update(self, master: Master, work: RoundWork, trainer: LocalTrainer) -> tuple[SignedUpdate, bytes]:
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
            micro_batch=self.options.micro_batch,
            checkpointing=self.options.checkpointing,
        )


def join_addresses(values: Sequence[str]) -> tuple[str, ...]:
    """Validate `--join` values early, so a typo fails in milliseconds with the expected form."""
    if not values:
        raise JoinError("no --join address given; pass the status page URL or the multiaddr the aggregator printed")
    for value in values:
        parse_join_address(value)
    return tuple(values)


JOIN_RETRY_BASE_S = 1.0
JOIN_RETRY_CAP_S = 8.0
MIN_JOIN_ATTEMPT_S = 5.0  # the shortest bootstrap worth trying: one ping's round trip through p2pd


async def join_within(timeout_s: float, start: Callable[[float], Awaitable[Node]]) -> Node:
    """`start(bootstrap_timeout_s)` until it joins, for up to `timeout_s` in all (the peer's --join-timeout).

    A joiner whose --join node is down for a moment (an aggregator restarting on its port) would otherwise
    exit at the first failed ping, long before the timeout it was given. The last JoinError is raised.
    """
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        try:
            return await start(max(MIN_JOIN_ATTEMPT_S, deadline - time.monotonic()))
        except JoinError as e:
            delay_s = backoff_s(attempt, base_s=JOIN_RETRY_BASE_S, cap_s=JOIN_RETRY_CAP_S)
            attempt += 1
            if time.monotonic() + delay_s + MIN_JOIN_ATTEMPT_S > deadline:
                raise
            logger.warning("%s; retrying in %.1f s", e, delay_s)
            await asyncio.sleep(delay_s)
