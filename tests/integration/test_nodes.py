"""The nodes as Python objects: a potluck.Aggregator and a potluck.Peer in this one process, the run's task
given to both as the same object (never imported), train a run to its end; stopping leaves no p2pd behind."""

import threading
from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from potluck import Aggregator, Peer, Task
from potluck.events import Event, RoundClosed
from tests.integration.swarm_helpers import p2pd_children

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUNDS = 3
WEIGHTS = torch.tensor([2.0, -1.0, 0.5, 3.0])


def _examples(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, len(WEIGHTS), generator=generator)
    return x, x @ WEIGHTS + 1.0


class Line(Task):
    """Fit a plane: y = x . WEIGHTS + 1 with one linear layer; work is counted in samples."""

    def build_model(self, *, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Linear(len(WEIGHTS), 1)

    def train_batches(self, *, seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield _examples(generator, batch_size)

    def held_out_batches(self, *, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(2**31)
        return [_examples(generator, batch_size) for _ in range(count)]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x).squeeze(-1), y)


class Seen:
    """The events a node's on_event was given (on the node's thread)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: type[Event]) -> list[Event]:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]


@pytest.mark.timeout(60)
def test_an_aggregator_and_a_peer_as_objects_train_a_task_object_to_the_runs_end(tmp_path) -> None:
    # Prepare: one task object for both nodes, a short run of it
    task, seen = Line(), Seen()
    settings = {"rounds": ROUNDS, "local_steps": 10, "round_deadline_s": 30, "inner.warmup_steps": 0}
    settings |= {"inner.lr": 0.05, "inner.batch_size": 16}
    aggregator = Aggregator(task=task, state_dir=tmp_path / "aggregator", settings=settings, on_event=seen)
    try:
        # Execute
        aggregator.start()
        peer = Peer(aggregator, task=task, identity=tmp_path / "peer.key", receipts=tmp_path / "receipts")
        with peer:
            assert peer.wait(timeout_s=45)
        assert aggregator.wait(timeout_s=30)
    finally:
        aggregator.stop()
    # Assert: the aggregator closed every round of the run with the peer's update in it, and the loss fell
    closed = seen.of(RoundClosed)
    assert [r.round for r in closed] == list(range(ROUNDS))
    assert peer.result is not None and peer.result.accepted == ROUNDS, peer.result
    assert all([a.fingerprint for a in r.accepted] == [peer.result.fingerprint] for r in closed), closed
    assert closed[-1].val_loss < aggregator.ready.val_loss, (aggregator.ready.val_loss, closed[-1].val_loss)
    assert aggregator.ready.run and aggregator.result is not None and aggregator.result.rounds_closed == ROUNDS
    # nothing is left running: no daemon of this process's nodes (each node's p2pd is a child of this process)
    assert p2pd_children() == []


@pytest.mark.timeout(60)
def test_stop_shuts_a_running_aggregator_down_mid_run_and_a_second_stop_does_nothing(tmp_path) -> None:
    # Prepare: an aggregator waiting for peers in its first round
    aggregator = Aggregator(task=Line(), state_dir=tmp_path / "aggregator", settings={"rounds": 5})
    try:
        aggregator.start()
        was_up = aggregator.running and bool(aggregator.addresses)
        # Execute
        aggregator.stop()
        aggregator.stop()
    finally:
        aggregator.stop()
    # Assert: it ran, and neither it nor its daemon runs now
    assert was_up and not aggregator.running and aggregator.result is None
    assert p2pd_children() == []
