"""Serverless mode: a run with no aggregator, whose peers average among themselves.

Aggregators are optional. Without one, each round every peer trains its local steps, applies the outer
step to its own copy of the master state with its own pseudo-gradient, then averages that state (the
master parameters and the outer momentum) with whoever is averaging at the time, through hivemind's
`DecentralizedAverager` (matchmaking over the DHT, then a butterfly all-reduce over libp2p), weighted
by the tokens each trained. The outer step is linear in the pseudo-gradient, so when the group started
the round from the same state this is exactly the outer step on the token-weighted mean pseudo-gradient
(DiLoCo); when it did not (a peer that averaged alone for a round, say), averaging the state pulls the
copies back together instead of letting them drift apart for good. A joiner downloads the current state
from a peer that has one (`load_state_from_peers`) before it trains.

What this mode cannot do, compared with a run that has an aggregator:

- nothing checks an update: no signatures or validation pipeline, no round-close statistics, no held-out
  loss check, no bans. hivemind's all-reduce averages whatever a groupmate sends, so one Byzantine peer can
  move everyone's model; use it among peers that trust each other;
- no ledger, no receipts, no status page (`potluck status --join ADDR` reads the peers' DHT records);
- hivemind's compression, not potluck's codecs: the state travels in fp16 (int8 for an `int8` run, fp32
  for `none`), about 2 bytes a parameter and another 2 for the momentum each round, where a top-k upload
  to an aggregator is ~0.03;
- no time-boxed rounds: a peer averages with whoever is ready when it is, so a slow peer averages with the
  next round's group, or alone.
"""

import asyncio
import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from potluck.errors import PotluckError
from potluck.events import Event, ServerlessReady, ServerlessRound, ServerlessSynced
from potluck.peer.trainer import LocalTrainer
from potluck.protocol.config import RunConfig
from potluck.protocol.identity import Identity
from potluck.tasks import initial_model, run_task
from potluck.tasks.held_out import HeldOutLoss
from potluck.training.diloco import OuterOptimizer, snapshot

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # hivemind's import runs torch.jit.script
    import hivemind
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
    from hivemind.utils.timed_storage import get_dht_time

logger = logging.getLogger(__name__)


MATCHMAKING_S = 3.0  # how long a peer gathers a group before the all-reduce starts
GROUP_TIMEOUT_FACTOR = 4  # a peer that finds no group within this many matchmaking times steps alone
STATE_TIMEOUT_S = 60.0  # a joiner's wait for a peer to send it the state
EVAL_BATCHES = 4  # held-out batches each peer scores after each round (it has no aggregator to do it)
STATUS_KEY = "potluck-serverless"  # DHT key of every serverless peer's progress; subkey "RUN/PEER ID"
STATUS_TTL_S = 300.0  # a peer's record outlives a few of its rounds, then drops out of `potluck status`


class ServerlessError(PotluckError):
    """The serverless peer cannot go on (one line, with the fix)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerlessOptions:
    """How this peer of an aggregator-less run runs."""

    cfg: RunConfig
    join: tuple[str, ...] = ()  # other peers' multiaddrs; empty: this peer starts the run
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    client_mode: bool = False
    data: str | None = None
    device: torch.device = torch.device("cpu")
    batch_size: int | None = None
    max_rounds: int | None = None
    speed: float = 1.0  # testing aid, as for PeerOptions
    micro_batch: int | None = None  # as for PeerOptions
    checkpointing: bool = False
    matchmaking_s: float = MATCHMAKING_S


def hivemind_compression(codec: str) -> CompressionBase:
    """The hivemind compression closest to the run's upload codec: its top-k codecs have no hivemind twin."""
    if codec == "none":
        return NoCompression()
    if codec == "int8":
        return Uniform8BitQuantization()
    return Float16Compression()


def averaging_prefix(cfg: RunConfig) -> str:
    """The DHT prefix a run's peers match under: one per run and config, so two runs never average together."""
    return f"potluck-{cfg.run_name}-{cfg.config_hash[:16]}"


class _StateAverager(DecentralizedAverager):
    """Averages the master parameters and outer momentum, and serves them, with the round, to joiners."""

    round: int = 0

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], Sequence[Any]]:
        with self.get_tensors() as tensors:
            return {"round": self.round}, [t.clone() for t in tensors], self.tensor_infos


class ServerlessPeer:
    """One peer of a run with no aggregator; `await run()` trains until the run's rounds or `max_rounds` are done."""

    def __init__(self, identity: Identity, options: ServerlessOptions, *, on_event: Callable[[Event], None]) -> None:
        self.identity = identity
        self.options = options
        self.on_event = on_event
        self.rounds_done = 0
        self.groups: list[int] = []  # the size of each round's averaging group (1: averaged alone)
        self._evaluate = HeldOutLoss(options.cfg, batches=EVAL_BATCHES)  # no aggregator scores the rounds here
        self._dht: hivemind.DHT | None = None

    async def run(self) -> None:
        """Start the DHT and the averager, catch up with the run, train its rounds; both stop on every exit path."""
        # In this thread, not a worker: hivemind's DHT and averager processes install signal handlers as they start.
        dht = self._start_dht()
        averager: _StateAverager | None = None
        try:
            trainer, outer, params, averager = self._setup(dht)
            cfg = self.options.cfg
            self.on_event(
                ServerlessReady(
                    role="serverless-peer",
                    run=cfg.run_name,
                    maddrs=tuple(str(m) for m in dht.get_visible_maddrs()),
                    val_loss=await asyncio.to_thread(self._evaluate, params),
                    num_params=sum(t.numel() for t in params.values()),
                    round=averager.round,
                )
            )
            self._dht = dht
            await self._rounds(trainer, outer, params, averager)
        finally:
            if averager is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(averager.shutdown)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(dht.shutdown)

    def _start_dht(self) -> hivemind.DHT:
        opts = self.options
        _quiet_about_gone_senders(logging.getLogger("hivemind.dht.dht"))  # before the DHT's process forks
        try:
            dht = hivemind.DHT(
                initial_peers=list(opts.join) or None,
                host_maddrs=list(opts.host_maddrs),
                client_mode=opts.client_mode,
                start=True,
            )
        except Exception as e:  # hivemind raises bare Exceptions for an unreachable bootstrap peer
            reason = " ".join(str(e).split())[:300]
            raise ServerlessError(f"could not start the DHT node or reach {', '.join(opts.join)}: {reason}") from e
        return dht

    def _publish(self, *, round: int, val_loss: float, group: int) -> None:
        """This peer's progress on the DHT, where `potluck status --join` finds it (there is no status page)."""
        if self._dht is None:
            return
        cfg = self.options.cfg
        value = {"round": round, "rounds": cfg.rounds, "val_loss": val_loss, "group": group, "time_s": time.time()}
        subkey = f"{cfg.run_name}/{self._dht.peer_id}"
        try:
            self._dht.store(STATUS_KEY, value, get_dht_time() + STATUS_TTL_S, subkey=subkey)
        except Exception as e:  # noqa: BLE001 - a status record is best effort; training goes on without it
            logger.warning("could not publish this peer's status for `potluck status`: %s", e)

    def _setup(
        self, dht: hivemind.DHT
    ) -> tuple[LocalTrainer, OuterOptimizer, dict[str, torch.Tensor], _StateAverager]:
        """The trainer, the outer optimizer and the master state: the run's initial one, or a peer's that has more."""
        opts, cfg = self.options, self.options.cfg
        trainer = LocalTrainer(
            cfg,
            public_key=self.identity.public_key,
            device=opts.device,
            data_source=opts.data,
            batch_size=opts.batch_size,
            speed=opts.speed,
            micro_batch=opts.micro_batch,
            checkpointing=opts.checkpointing,
        )
        params = snapshot(initial_model(cfg, run_task(cfg)), device="cpu")
        outer = OuterOptimizer(kind=cfg.outer.kind, lr=cfg.outer.lr, momentum=cfg.outer.momentum)
        momentum = {name: torch.zeros_like(t) for name, t in params.items()} if outer.kind == "nesterov" else {}
        averaged = [*params.values(), *momentum.values()]
        averager = _StateAverager(
            [t.clone() for t in averaged],
            dht,
            start=True,
            prefix=averaging_prefix(cfg),
            min_group_size=2,
            min_matchmaking_time=opts.matchmaking_s,
            request_timeout=max(1.0, opts.matchmaking_s / 2),
            allreduce_timeout=cfg.round_deadline_s,
            compression=hivemind_compression(cfg.codec.name),
            state_compression=hivemind_compression(cfg.codec.name),
            client_mode=opts.client_mode,
        )
        try:
            round_index, source = self._catch_up(averager, averaged)
        except BaseException:
            averager.shutdown()
            raise
        with averager.get_tensors() as mine:
            params = {name: mine[i].clone() for i, name in enumerate(params)}
            if momentum:
                outer.load_state_dict({name: mine[len(params) + i].clone() for i, name in enumerate(momentum)})
        averager.round = round_index
        trainer.start_round(params, round_index=round_index)
        self.on_event(ServerlessSynced(run=cfg.run_name, round=round_index, source=source))
        return trainer, outer, params, averager

    def _catch_up(self, averager: _StateAverager, averaged: Sequence[torch.Tensor]) -> tuple[int, str]:
        """(round, "peer") after loading a peer's state into the averager; (0, "seed") when no peer has one yet."""
        round_index, source = 0, "seed"
        if self.options.join:
            try:
                loaded = averager.load_state_from_peers(timeout=STATE_TIMEOUT_S)
            except TimeoutError:
                raise ServerlessError(
                    f"no peer sent the run's state within {STATE_TIMEOUT_S:.0f} s; are the --join peers training?"
                ) from None
            if loaded is not None:
                source = "peer"
                metadata, tensors = loaded
                round_index = int(metadata["round"]) if isinstance(metadata, dict) and "round" in metadata else 0
                if len(tensors) != len(averaged) or any(
                    a.shape != b.shape for a, b in zip(tensors, averaged, strict=False)
                ):
                    raise ServerlessError("a peer sent a state of another shape: is it running another run config?")
                if not all(bool(torch.isfinite(t).all()) for t in tensors):
                    raise ServerlessError("a peer sent a state with NaN or infinite values; restart to try another")
                with averager.get_tensors() as mine:
                    for dst, src in zip(mine, tensors, strict=True):
                        dst.copy_(src)
        return round_index, source

    async def _rounds(
        self, trainer: LocalTrainer, outer: OuterOptimizer, params: dict[str, torch.Tensor], averager: _StateAverager
    ) -> None:
        """Train, step, average, evaluate: one status event per round."""
        opts, cfg = self.options, self.options.cfg
        r = averager.round
        while r < cfg.rounds and (opts.max_rounds is None or self.rounds_done < opts.max_rounds):
            await asyncio.to_thread(trainer.train, max_steps=cfg.local_steps)
            shot = await asyncio.to_thread(trainer.take_snapshot)
            delta = {name: shot.base[name] - shot.current[name] for name in shot.base}
            if not all(bool(torch.isfinite(t).all()) for t in delta.values()):
                raise ServerlessError(f"local training diverged in round {r}: the model's values are no longer finite")
            tokens = shot.work
            outer.step(params, delta)  # this peer's own outer step; the average makes it the group's
            momentum = outer.state_dict()
            with averager.get_tensors() as mine:
                for dst, src in zip(
                    mine, [*params.values(), *(momentum[n] for n in params if n in momentum)], strict=True
                ):
                    dst.copy_(src)
            started = time.monotonic()
            try:
                gathered = await _averaged(
                    averager, weight=float(tokens), r=r, timeout_s=GROUP_TIMEOUT_FACTOR * opts.matchmaking_s
                )
            except Exception as e:  # noqa: BLE001 - hivemind reports a failed matchmaking or all-reduce in many types
                logger.warning(
                    "round %d: averaging failed (%s); keeping this peer's own step", r, " ".join(str(e).split())[:200]
                )
                gathered = None
            average_s = time.monotonic() - started
            group = len(gathered) if gathered else 1
            if gathered and any(isinstance(g, dict) and g.get("round") != r for g in gathered.values()):
                logger.info(
                    "round %d: averaged with peers of other rounds (%s)",
                    r,
                    sorted({str(g.get("round")) for g in gathered.values() if isinstance(g, dict)}),
                )
            with averager.get_tensors() as mine:
                params = {name: mine[i].clone() for i, name in enumerate(params)}
                if momentum:
                    outer.load_state_dict({name: mine[len(params) + i].clone() for i, name in enumerate(params)})
            r += 1
            averager.round = r
            trainer.start_round(params, round_index=r)
            val_loss = await asyncio.to_thread(self._evaluate, params)
            self.rounds_done += 1
            self.groups.append(group)
            await asyncio.to_thread(self._publish, round=r, val_loss=val_loss, group=group)
            self.on_event(
                ServerlessRound(
                    round=r - 1,
                    loss=math.fsum(shot.losses) / max(1, len(shot.losses)),
                    val_loss=val_loss,
                    tokens=tokens,
                    inner_steps=len(shot.losses),
                    compute_s=shot.compute_s,
                    average_s=average_s,
                    group=group,
                    time_s=time.time(),
                )
            )


class _GoneSenderFilter(logging.Filter):
    """Drops the DHT process's report of a request it could not unpickle because the process that sent it has
    exited: the averager's last announcement, read after the averager stopped on Ctrl-C. It is logged as an
    ERROR with a traceback, at every stop, and says nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.funcName == "_run" and isinstance(error, (ConnectionError, FileNotFoundError)))


def _quiet_about_gone_senders(logger: logging.Logger) -> None:
    if not any(isinstance(f, _GoneSenderFilter) for f in logger.filters):
        logger.addFilter(_GoneSenderFilter())


async def _averaged(averager: _StateAverager, *, weight: float, r: int, timeout_s: float) -> Any:
    """One averaging step, awaited on this loop: cancelling it (Ctrl-C, SIGTERM) cancels the step, where a step
    waited for in a worker thread would keep that thread, and the loop's shutdown, waiting on an averager that has
    stopped answering."""
    control = averager.step(weight=weight, gather={"round": r}, timeout=timeout_s, wait=False)
    try:
        return await control
    except asyncio.CancelledError:
        if control.cancelled():  # the averager gave the step up, and this task is not being stopped: a failed round
            raise RuntimeError("the averager cancelled the step") from None
        control.cancel()
        raise


def serverless_status(join: Sequence[str], *, timeout_s: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """The serverless runs the DHT at `join` knows of: run name -> its peers' latest records, newest first.

    Read as a client node (it serves nothing and stores nothing); ServerlessError when `join` cannot be reached.
    """
    try:
        dht = hivemind.DHT(initial_peers=list(join), client_mode=True, start=True)
    except Exception as e:  # hivemind raises bare Exceptions for an unreachable bootstrap peer
        reason = " ".join(str(e).split())[:300]
        raise ServerlessError(f"could not reach {', '.join(join)}: {reason}") from e
    try:
        found = dht.get(STATUS_KEY, latest=True, return_future=True).result(timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - a timeout or a DHT failure: say so in one line
        raise ServerlessError(f"the DHT at {', '.join(join)} did not answer within {timeout_s:.0f} s ({e})") from e
    finally:
        dht.shutdown()
    return parse_status_records(found.value if found is not None else None)


def parse_status_records(records: object) -> dict[str, list[dict[str, Any]]]:
    """The well-formed peer records under STATUS_KEY, by run, newest first; anything else is skipped.

    The key is not validated (anyone can write under it), so nothing here trusts a record's shape.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for subkey, item in (records if isinstance(records, dict) else {}).items():
        value = getattr(item, "value", None)
        if not isinstance(subkey, str) or "/" not in subkey or not isinstance(value, dict):
            continue
        run, peer_id = subkey.rsplit("/", 1)
        record: dict[str, Any] = {k: value.get(k) for k in ("round", "rounds", "val_loss", "group", "time_s")}
        counts = all(type(record[k]) is int and record[k] >= 0 for k in ("round", "rounds", "group"))
        numbers = all(isinstance(record[k], float) and math.isfinite(record[k]) for k in ("val_loss", "time_s"))
        if run and peer_id and counts and numbers:
            runs.setdefault(run, []).append({"peer": peer_id, **record})
    for peers in runs.values():
        peers.sort(key=lambda p: p["time_s"], reverse=True)
    return runs
