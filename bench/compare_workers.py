"""The baselines' worker processes for bench/compare_systems.py: one OS process per peer.

    python bench/compare_workers.py hivemind --rank 0 --peers 4 --rounds 6 --host 10.x.y.2
    python bench/compare_workers.py ddp-powersgd --rank 1 --peers 4 --rounds 6 --master-addr 10.x.y.2 \\
        --master-port 29500 --set model.size=small --set seed=1

All train exactly what `potluck swarm` trains: the run config's defaults (`RunConfig()` with `--rounds` and
`--set`), the same GPT from the same seed, the same built-in corpus, potluck's `BatchSampler` (a per-peer seed, as a
potluck peer draws its own windows), potluck's `inner_step` (AdamW, grad clip 1.0) at potluck's inner learning
rate schedule over `rounds x local_steps` steps, and potluck's held-out loss: `evaluate` over the aggregator's
8 fixed `val_batches`. Only the first peer evaluates, after every `local_steps` steps (DDP) or every averaging
round (hivemind): the cadence of potluck's rounds.

**hivemind.Optimizer** runs with `use_local_updates=True`: each peer takes a local AdamW step per batch and the
peers average their parameters (fp16 on the wire, `Float16Compression`) each time the swarm has processed
`target_batch_size = peers x local_steps x batch_size` samples, i.e. about every `local_steps` steps per peer.
That is DiLoCo with plain averaging as the outer step (lr 1, no momentum), the closest thing hivemind offers to
potluck. The other documented mode, accumulating gradients to `target_batch_size` for one global step, would
take one optimizer step per round with the same tokens and learn far less. Two systems:

- `hivemind`: its default, `delay_state_averaging=True`: averaging runs in a background thread while the peer
  trains on, and the averaged result is folded in by the delta rule (hivemind's own overlap);
- `hivemind-blocking`: `delay_state_averaging=False`: the step that ends an epoch waits for the average, so the
  loss measured after an epoch is the averaged model's, as potluck's rounds measure the new master state.

`matchmaking_time` 3 s (MATCHMAKING_S): hivemind's guide says 3-5 s for small runs and 10-15 s over the internet;
the lab has bandwidth limits but no latency. With `target_group_size` = the number of peers a group starts
averaging as soon as every peer is in it rather than after the whole matchmaking time (potluck's aggregator, too,
closes a round once every known peer has reported), so it only bounds the wait for a missing peer.
`averaging_timeout` 30 s: the guide says about twice an all-reduce; it also bounds a straggler's state download
(parameters and AdamW moments) on oversubscribed cores, so it is generous rather than tight.

**DDP** is `DistributedDataParallel` over gloo: every step all-reduces the gradients, then each rank takes the same
AdamW step. Three systems, the hooks a PyTorch user reaches for first (`ddp_hook`): `ddp` (fp32), `ddp-bf16`
(torch's `bf16_compress_hook`) and `ddp-powersgd` (torch's PowerSGD hook as its documentation advises).
Communication time is the part of a step spent waiting for the all-reduce after the backward pass has finished
(measured around the hook), and compute is the rest of the step.

`--set KEY=VALUE` overrides the run config as `potluck swarm --set` does (model size, seed, local steps, batch),
so a baseline trains exactly what the swarm it is compared with trains.

Each worker prints JSON lines on stdout: `ready` (hivemind: its multiaddrs), `eval` (first peer only: `t`
seconds since the process started, `time_s` epoch seconds, `val_loss`, `step`), and `done` (`compute_s`: time in
forward, backward and optimizer steps, communication and evaluation excluded; `wall_s`; `tokens`; `active_s`,
from its first step's start to its last step's end). hivemind workers wait for a line on stdin after `ready`, so
that every peer starts training together (potluck's aggregator holds its first round for all peers the same way).
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.nn as nn

from potluck.peer.trainer import sampler_seed
from potluck.protocol.config import RunConfig
from potluck.protocol.config_files import parse_overrides
from potluck.training.data import BatchSampler, load_corpus, val_batches
from potluck.training.diloco import inner_lr, inner_step, load_params, make_inner_optimizer, snapshot
from potluck.training.evaluate import evaluate
from potluck.training.models import build_model, model_config

HIVEMIND_SYSTEMS = ("hivemind", "hivemind-blocking")
DDP_SYSTEMS = ("ddp", "ddp-bf16", "ddp-powersgd")
MATCHMAKING_S = 3.0  # hivemind's guide: 3-5 s for small runs (the issue asked for 2-3 s); the lab has no latency
POWERSGD_RANK = 4  # torch's guide: start at 1 and double until the accuracy satisfies; 1-4 is typical
# PowerSGD over gloo: every gradient in one bucket. With several (the `small` model), the ranks issued the hook's
# chained all-reduces in different orders and gloo aborted on a size mismatch; the tiny model fits one anyway.
BUCKET_CAP_MB = 1024
EVAL_BATCHES = 8  # the aggregator's held-out batches per evaluation (ServerOptions.eval_batches)
RUN_ID = "potluck-compare-systems"
SHUTDOWN_S = 20.0  # after `done`, a worker whose libraries hang on shutdown exits anyway
STARTED = time.monotonic()


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, stamped with seconds since this process started and epoch seconds."""
    print(json.dumps({"event": event, "t": time.monotonic() - STARTED, "time_s": time.time(), **fields}), flush=True)


class Worker:
    """What both baselines share: the run config, model, optimizer, data stream, held-out batches and timers."""

    def __init__(self, *, system: str, rank: int, peers: int, rounds: int, overrides: dict[str, Any]) -> None:
        self.cfg = RunConfig().with_overrides({**overrides, "rounds": rounds}, source="compare_workers")
        self.rank = rank
        model_cfg = model_config(self.cfg.model.size, block_size=self.cfg.model.block_size)
        self.model = build_model(model_cfg, seed=self.cfg.seed)
        inner = self.cfg.inner
        self.optimizer = make_inner_optimizer(
            self.model, lr=inner.lr, betas=(inner.beta1, inner.beta2), weight_decay=inner.weight_decay
        )
        corpus = load_corpus(
            self.cfg.data.source, val_fraction=self.cfg.data.val_fraction, max_bytes=self.cfg.data.max_bytes
        )
        self.sampler = BatchSampler(
            corpus.train,
            batch_size=inner.batch_size,
            block_size=model_cfg.block_size,
            shard=0,
            num_shards=1,
            # a system's variants (ddp-bf16, hivemind-blocking, ...) draw their family's data stream
            seed=sampler_seed(self.cfg.seed, f"{system.split('-')[0]}/peer-{rank}/of-{peers}".encode()),
        )
        self.val_set = val_batches(
            corpus.val, batch_size=inner.batch_size, block_size=model_cfg.block_size, num_batches=EVAL_BATCHES
        )
        self.total_steps = self.cfg.rounds * self.cfg.local_steps
        self.tokens_per_step = inner.batch_size * model_cfg.block_size
        self.steps = 0
        self.compute_s = 0.0
        self.comm_s = 0.0  # filled in by the baseline: time inside a step spent communicating
        self.eval_s = 0.0
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, comm_s: Callable[[], float]) -> float:
        """One inner step at potluck's learning rate for this step; compute time is the step less `comm_s()`."""
        inner = self.cfg.inner
        lr = inner_lr(
            min(self.steps, self.total_steps - 1),
            total_steps=self.total_steps,
            peak_lr=inner.lr,
            warmup_steps=inner.warmup_steps,
            min_lr_ratio=inner.min_lr_ratio,
        )
        started = time.monotonic()
        loss = inner_step(model, optimizer, self.sampler.next_batch(), lr=lr, grad_clip=inner.grad_clip)
        ended = time.monotonic()
        waited = comm_s()
        self.comm_s += waited
        self.compute_s += max(0.0, ended - started - waited)
        self.first_step_at = started if self.first_step_at is None else self.first_step_at
        self.last_step_at = ended
        self.steps += 1
        return loss

    def evaluate(self, model: nn.Module, *, step: int, **fields: Any) -> None:
        """The held-out loss on the first peer only (an `eval` event); its time counts as neither compute nor comm."""
        if self.rank != 0:
            return
        started = time.monotonic()
        loss = evaluate(model, self.val_set, device="cpu")
        self.eval_s += time.monotonic() - started
        emit("eval", val_loss=loss, step=step, tokens=step * self.tokens_per_step, **fields)

    def done(self, **fields: Any) -> None:
        """The `done` event; then a watchdog makes sure the process exits even if a library's shutdown hangs."""
        first, last = self.first_step_at, self.last_step_at
        active_s = 0.0 if first is None or last is None else last - first
        emit(
            "done",
            rank=self.rank,
            steps=self.steps,
            tokens=self.steps * self.tokens_per_step,
            compute_s=self.compute_s,
            comm_s=self.comm_s,
            eval_s=self.eval_s,
            active_s=active_s,
            wall_s=time.monotonic() - STARTED,
            **fields,
        )
        timer = threading.Timer(SHUTDOWN_S, os._exit, args=(0,))
        timer.daemon = True
        timer.start()


def run_hivemind(args: argparse.Namespace) -> None:
    """A hivemind.Optimizer peer with local AdamW updates and parameter averaging every `local_steps` steps,
    in the background (hivemind's default, `hivemind`) or blocking the step that starts it (`hivemind-blocking`)."""
    import hivemind
    from hivemind.compression import Float16Compression

    worker = Worker(system=args.system, rank=args.rank, peers=args.peers, rounds=args.rounds, overrides=args.overrides)
    cfg = worker.cfg
    start = snapshot(worker.model)
    dht = hivemind.DHT(
        initial_peers=[args.initial_peer] if args.initial_peer else None,
        host_maddrs=[f"/ip4/{args.host}/tcp/0"],
        start=True,
    )
    optimizer = hivemind.Optimizer(
        dht=dht,
        run_id=RUN_ID,
        target_batch_size=args.peers * cfg.local_steps * cfg.inner.batch_size,
        batch_size_per_step=cfg.inner.batch_size,
        optimizer=worker.optimizer,
        use_local_updates=True,
        delay_state_averaging=args.system == "hivemind",
        average_state_every=1,
        state_averaging_compression=Float16Compression(),
        load_state_compression=Float16Compression(),
        matchmaking_time=MATCHMAKING_S,
        averaging_timeout=30.0,
        averager_opts={"target_group_size": args.peers},
        verbose=False,
    )
    # hivemind fills the AdamW state with one step on zero gradients, which decays the weights once; undo it, so
    # that training starts from the very model (and a fresh AdamW) that the other systems start from.
    load_params(worker.model, start)
    for state in worker.optimizer.state.values():
        state["step"].zero_()
    comm = _time_calls(optimizer, ("_update_global_epoch", "load_state_from_peers"))
    emit("ready", rank=args.rank, maddrs=[str(m) for m in dht.get_visible_maddrs()])
    sys.stdin.readline()  # the orchestrator's go: every peer is up
    worker.evaluate(worker.model, step=0, epoch=0)
    # Train until the swarm has averaged `rounds` times; twice the planned steps bounds a peer left alone.
    # A peer left behind once the others have finished the run (background averaging can leave one an epoch
    # behind) would look for a group that never forms: it stops when the swarm's epoch says the run is over.
    while (
        optimizer.local_epoch < cfg.rounds
        and optimizer.tracker.global_epoch < cfg.rounds
        and worker.steps < 2 * worker.total_steps
    ):
        epoch = optimizer.local_epoch
        worker.step(worker.model, optimizer, comm_s=comm)
        if optimizer.local_epoch != epoch:
            worker.evaluate(worker.model, step=worker.steps, epoch=optimizer.local_epoch)
    if optimizer.local_epoch < cfg.rounds:  # it stopped early: its model as it is now is its final one
        worker.evaluate(worker.model, step=worker.steps, epoch=optimizer.local_epoch, left_behind=True)
    worker.done(epochs=optimizer.local_epoch)
    optimizer.shutdown()
    dht.shutdown()


def _time_calls(obj: object, names: tuple[str, ...]) -> Callable[[], float]:
    """Wrap methods of `obj` with timers; the returned function gives the seconds spent in them since its last call."""
    spent = [0.0]

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            started = time.monotonic()
            try:
                return method(*a, **k)
            finally:
                spent[0] += time.monotonic() - started

        return call

    for name in names:
        setattr(obj, name, timed(getattr(obj, name)))

    def take() -> float:
        value, spent[0] = spent[0], 0.0
        return value

    return take


def run_ddp(args: argparse.Namespace) -> None:
    """A DDP rank over gloo: an all-reduce of the gradients (fp32, or through torch's bf16 or PowerSGD hook) and
    an AdamW step per batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    worker = Worker(system=args.system, rank=args.rank, peers=args.peers, rounds=args.rounds, overrides=args.overrides)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master_addr}:{args.master_port}",
        rank=args.rank,
        world_size=args.peers,
        timeout=timedelta(seconds=120),
    )
    bucket_cap_mb = BUCKET_CAP_MB if args.system == "ddp-powersgd" else None  # None: DDP's own default
    model = DistributedDataParallel(worker.model, bucket_cap_mb=bucket_cap_mb)
    buckets: list[tuple[float, float]] = []  # (ready, all-reduced) per gradient bucket of the current step
    hook, hook_state = ddp_hook(
        args.system, total_steps=worker.total_steps, warmup_steps=worker.cfg.inner.warmup_steps
    )

    def timed(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        ready = time.monotonic()

        def finished(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            buckets.append((ready, time.monotonic()))
            return fut.value()

        return hook(hook_state, bucket).then(finished)

    model.register_comm_hook(None, timed)

    def waited() -> float:
        """The backward pass is done once the last bucket is ready; what follows is waiting for the network."""
        if not buckets:
            return 0.0
        wait = max(end for _, end in buckets) - max(ready for ready, _ in buckets)
        buckets.clear()
        return max(0.0, wait)

    emit("ready", rank=args.rank)
    worker.evaluate(worker.model, step=0)
    local_steps = worker.cfg.local_steps
    while worker.steps < worker.total_steps:
        worker.step(model, worker.optimizer, comm_s=waited)
        if worker.steps % local_steps == 0:
            worker.evaluate(worker.model, step=worker.steps)
    worker.done()
    dist.barrier()  # no rank tears gloo down while another's last all-reduce is in flight (PowerSGD aborted so)
    dist.destroy_process_group()


def ddp_hook(system: str, *, total_steps: int, warmup_steps: int) -> tuple[Callable[..., Any], object]:
    """The communication hook (and its state) a PyTorch user would register for this DDP system.

    `ddp`: the plain fp32 all-reduce. `ddp-bf16`: torch's `bf16_compress_hook` (half the bytes). `ddp-powersgd`:
    torch's PowerSGD as its documentation advises: error feedback and warm start on, vanilla all-reduce for the
    first 10% of the steps and never before warm-up ends, rank POWERSGD_RANK.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if system == "ddp":
        return default_hooks.allreduce_hook, None  # state None: the default process group
    if system == "ddp-bf16":
        return default_hooks.bf16_compress_hook, None
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=POWERSGD_RANK,
        start_powerSGD_iter=max(2, total_steps // 10, warmup_steps),
        use_error_feedback=True,
        warm_start=True,
    )
    return powerSGD_hook.powerSGD_hook, state


def main() -> None:
    """Parse the worker's flags and run one peer of one baseline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=(*HIVEMIND_SYSTEMS, *DDP_SYSTEMS))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--host", default="127.0.0.1", help="hivemind: the address to listen on")
    parser.add_argument("--initial-peer", default=None, help="hivemind: the first peer's multiaddr")
    parser.add_argument("--master-addr", default="127.0.0.1", help="ddp: rank 0's address")
    parser.add_argument("--master-port", type=int, default=29500, help="ddp: rank 0's TCP store port")
    parser.add_argument("--timeout-s", type=int, default=1800, help="hard limit: SIGALRM ends the process")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE run-config override (repeatable)")
    args = parser.parse_args()
    args.overrides = parse_overrides(args.set)
    signal.alarm(args.timeout_s)  # the default action of SIGALRM terminates the process
    torch.set_num_threads(args.threads)
    (run_hivemind if args.system in HIVEMIND_SYSTEMS else run_ddp)(args)


if __name__ == "__main__":
    main()
