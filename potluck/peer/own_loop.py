"""Your own training loop in a run: an optimizer wrapper in the spirit of hivemind.Optimizer.

The user keeps their loop (`loss.backward(); opt.step(); opt.zero_grad()`) and their model and inner
optimizer. The wrapper runs a peer (the same code as `potluck peer`: sync, time-boxed rounds, signed
updates, checks, receipts) in a background thread whose inner steps are the user's: each `step()`
is one inner step of the open round. When the round has its steps (or its time box is full), the peer
encodes and submits the round's update and applies the aggregate to the user's model; `step()` waits
meanwhile. A gradient the user computed while the model was being replaced is dropped, not applied to
the new state (one forward and backward per round).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from potluck.errors import PotluckError
from potluck.events import Event
from potluck.peer.options import PeerOptions, RunFinished
from potluck.peer.runner import PeerRunner, join_addresses
from potluck.peer.trainer import LocalTrainer
from potluck.protocol.config import RunConfig
from potluck.protocol.identity import load_or_create_identity
from potluck.protocol.stopping import quiet_about_cancellation
from potluck.tasks import Task, allow_task

__all__ = ["Optimizer", "OwnLoopTrainer"]

START_TIMEOUT_S = 600.0  # joining: DHT, the state's download, the task's build


class OwnLoopTrainer(LocalTrainer):
    """A LocalTrainer whose inner steps are taken by the user's loop (`user_step`), not by `train`."""

    def __init__(self, cfg: RunConfig, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self._turn = threading.Condition()
        self._open = False  # a round is taking steps
        self._max_steps = 0
        self._version = 0  # bumped whenever the model is moved onto another state
        self._stepped_at = 0  # the version the user's last step saw
        self.closed = False

    def start_round(self, master: Any, *, round_index: int) -> None:
        """Reset the model to the round's master state (a gradient computed before is now stale)."""
        super().start_round(master, round_index=round_index)
        with self._turn:
            self._version += 1

    def rebase(self, master: Any, *, point: Any) -> int:
        """As LocalTrainer's; the model moved."""
        kept = super().rebase(master, point=point)
        with self._turn:
            self._version += 1
        return kept

    def train(
        self,
        *,
        max_steps: int,
        stop: Callable[[], bool] | None = None,
        cancel: threading.Event | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        """Open the round to the user's steps until it has `max_steps`, the time box is full, or it is cancelled."""
        with self._turn:
            self._open, self._max_steps = True, max_steps
            self._turn.notify_all()
            while not (
                self.round_steps >= max_steps
                or (self.round_steps > 0 and stop is not None and stop())
                or (cancel is not None and cancel.is_set())
                or self.closed
            ):
                self._turn.wait(timeout=0.1)
            self._open = False

    def user_step(self, *, work: int, loss: float, timeout_s: float) -> bool:
        """The user's gradients as one inner step of the open round; False when they were stale and dropped."""
        deadline = time.monotonic() + timeout_s
        with self._turn:
            while not (self._open and self.round_steps < self._max_steps) and not self.closed:
                if not self._turn.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise PotluckError(f"no round opened for this step in {timeout_s:.0f} s")
            if self.closed:
                return False
            stale = self._stepped_at != self._version
            self._stepped_at = self._version
        started = time.monotonic()
        with self._lock:
            if stale:
                self.optimizer.zero_grad(set_to_none=True)
                return False
            self.optimizer.step()
            self.global_step += 1
        took = time.monotonic() - started
        with self._lock:
            self._losses.append(loss)
            self._compute_s += took
            self._work += work
        self.total_work += work
        self.total_steps += 1
        self.total_compute_s += took
        self.first_step_at = started if self.first_step_at is None else self.first_step_at
        self.last_step_at = time.monotonic()
        with self._turn:
            self._turn.notify_all()
        return True

    def close(self) -> None:
        """No more steps: a waiting `train` or `user_step` returns."""
        with self._turn:
            self.closed = True
            self._turn.notify_all()


class _OwnLoopPeer(PeerRunner):
    """A peer whose trainer is the user's model and optimizer."""

    def __init__(self, model: torch.nn.Module, inner: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user_model, self.inner = model, inner
        self.ready = threading.Event()

    def make_trainer(self, cfg: RunConfig) -> OwnLoopTrainer:
        trainer = OwnLoopTrainer(
            cfg,
            public_key=self.identity.public_key,
            device=self.options.device,
            model=self.user_model,
            optimizer=self.inner,
        )
        self.ready.set()
        return trainer


class Optimizer:
    """Join a run with your own loop: `loss.backward(); opt.step(); opt.zero_grad()`, as with any optimizer.

    `model` must be the architecture the run trains (its task's fingerprint); its weights are replaced by
    the run's state when the first round opens. `inner` is your optimizer (e.g. AdamW), stepped once per
    `step()`. `join`: the aggregator's multiaddr(s), as `peer --join` takes them. `task`: the run's task when
    it is one of your own (its import path, or the Task object). `on_event` sees the peer's typed events.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        *,
        join: Sequence[str],
        identity: str | Path = Path("~/.potluck/identity.key"),
        task: str | Task | None = None,
        receipts_dir: str | Path = Path("~/.potluck/receipts"),
        max_rounds: int | None = None,
        host: str = "127.0.0.1",
        on_event: Callable[[Event], None] = lambda event: None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if isinstance(task, Task):
            allow_task(f"{type(task).__module__}:{type(task).__qualname__}", task)
        elif task is not None:
            allow_task(task)
        key, _ = load_or_create_identity(Path(identity).expanduser())
        device = next(model.parameters()).device
        options = PeerOptions(
            join=join_addresses(list(join)),
            host_maddrs=(f"/ip4/{host}/tcp/0",),
            device=device,
            max_rounds=max_rounds,
            receipts_dir=Path(receipts_dir).expanduser(),
            serve_state=False,
        )
        self.model, self.inner = model, inner
        self._peer = _OwnLoopPeer(model, inner, key, options, on_event=on_event)
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="potluck-peer", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self._peer.ready.wait(timeout=0.1):
            self._raise_failure()
            if time.monotonic() > deadline:
                raise PotluckError(f"did not join the run within {start_timeout_s:.0f} s")

    def _serve(self) -> None:
        async def serve() -> None:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            self._loop.set_exception_handler(quiet_about_cancellation)
            await self._peer.run()

        try:
            asyncio.run(serve())
        except (RunFinished, asyncio.CancelledError):
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the user's thread, raised at its next step
            self._failure = e
        finally:
            self._finished.set()
            trainer = self._peer.trainer
            if isinstance(trainer, OwnLoopTrainer):
                trainer.close()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def done(self) -> bool:
        """Whether the run (or this peer's max_rounds) is over: further steps do nothing."""
        return self._finished.is_set()

    def step(self, *, work: int, loss: float = float("nan"), timeout_s: float = START_TIMEOUT_S) -> bool:
        """One inner step with the gradients the model holds; `work`: what the batch was worth (its tokens).

        Waits while a round closes. Returns False when the step was not taken: the gradients were computed
        on a state since replaced (dropped), or the run is over. Raises what stopped the peer, if it failed.
        """
        self._raise_failure()
        trainer = self._peer.trainer
        if self.done or not isinstance(trainer, OwnLoopTrainer):
            return False
        taken = trainer.user_step(work=work, loss=loss, timeout_s=timeout_s)
        self._raise_failure()
        return taken

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As the inner optimizer's."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def close(self, timeout_s: float = 60.0) -> None:
        """Leave the run: the peer stops where it is (as on Ctrl-C) and its node shuts down."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not self.done:
            loop.call_soon_threadsafe(task.cancel)
        trainer = self._peer.trainer
        if isinstance(trainer, OwnLoopTrainer):
            trainer.close()
        self._thread.join(timeout=timeout_s)
