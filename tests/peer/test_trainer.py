"""The peer's local round: inner steps from the master state, an encoded delta, and taking back a refused one."""

import threading
import time

import pytest
import torch

from potluck.peer import trainer as trainer_module
from potluck.peer.trainer import LocalTrainer, TrainingDiverged, sampler_seed
from potluck.protocol.config import RunConfig
from potluck.training.diloco import snapshot

CFG = RunConfig(local_steps=3, rounds=4, inner={"warmup_steps": 1, "batch_size": 4}, data={"max_bytes": 300_000})


@pytest.fixture(scope="module")
def trainer() -> LocalTrainer:
    return LocalTrainer(CFG, public_key=b"\x01" * 32, device=torch.device("cpu"))


def _spec(trainer: LocalTrainer) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in trainer.model.named_parameters()}


def test_a_round_trains_the_local_steps_and_encodes_the_delta(trainer: LocalTrainer) -> None:
    # Prepare
    master = snapshot(trainer.model, device="cpu")
    # Execute
    work = trainer.train_round(master, round_index=0, time_budget_s=1e9)
    # Assert
    assert work.inner_steps == 3
    assert work.tokens == 3 * 4 * trainer.task.block_size
    delta = trainer.codec.decode(work.payload, _spec(trainer))
    assert any(float(t.abs().sum()) > 0 for t in delta.values())
    assert work.mean_loss > 0 and work.compute_s > 0


def test_an_exhausted_time_budget_sends_what_it_has(trainer: LocalTrainer) -> None:
    master = snapshot(trainer.model, device="cpu")

    work = trainer.train_round(master, round_index=1, time_budget_s=0.0)

    assert work.inner_steps == 1
    assert work.tokens == 4 * trainer.task.block_size


def test_each_peer_draws_its_own_batches() -> None:
    seeds = {sampler_seed(0, bytes([i]) * 32) for i in range(50)}
    assert len(seeds) == 50
    assert all(0 <= s < 2**62 for s in seeds)
    assert sampler_seed(0, b"\x01" * 32) == sampler_seed(0, b"\x01" * 32) != sampler_seed(1, b"\x01" * 32)


def test_a_diverged_round_is_one_clear_error_not_a_codec_traceback() -> None:
    # Prepare: a master state that has blown up (its own trainer: the optimizer state gets poisoned)
    trainer = LocalTrainer(CFG, public_key=b"\x02" * 32, device=torch.device("cpu"))
    master = snapshot(trainer.model, device="cpu")
    master = {name: t * float("inf") if i == 0 else t for i, (name, t) in enumerate(master.items())}
    # Execute / Assert
    with pytest.raises(TrainingDiverged, match="local training diverged in round 2"):
        trainer.train_round(master, round_index=2, time_budget_s=1e9)


def test_a_rebase_moves_onto_the_new_master_and_keeps_the_progress_since_the_snapshot() -> None:
    # Prepare: one round trained and snapshotted, then two more steps taken "while it is in flight"
    trainer = LocalTrainer(CFG, public_key=b"\x03" * 32, device=torch.device("cpu"))
    master = snapshot(trainer.model, device="cpu")
    trainer.start_round(master, round_index=0)
    trainer.train(max_steps=3)
    shot = trainer.take_snapshot()
    trainer.train(max_steps=2)
    progress = {n: p.detach().clone() - shot.current[n] for n, p in trainer.model.named_parameters()}
    new_master = {n: t + 0.01 for n, t in master.items()}
    # Execute
    trainer.rebase(new_master, point=shot.current)
    # Assert: model = new master + progress, and the next delta is measured from the new master
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), new_master[name] + progress[name])
    assert trainer.round_steps == 2  # the early steps count towards the round the new master opens
    work = trainer.encode(trainer.take_snapshot(), round_index=1)
    assert work.inner_steps == 2 and work.tokens == 2 * trainer.task.most_work(batch_size=trainer.batch_size)


def test_overlapped_steps_run_from_the_guess_and_move_with_it_onto_the_real_master() -> None:
    # Prepare: a round trained and snapshotted
    trainer = LocalTrainer(CFG, public_key=b"\x05" * 32, device=torch.device("cpu"))
    master = snapshot(trainer.model, device="cpu")
    trainer.start_round(master, round_index=0)
    trainer.train(max_steps=3)
    shot = trainer.take_snapshot()
    guess = {n: t - 0.02 for n, t in master.items()}
    # Execute: onto the guess, two steps while the aggregate is in flight, then onto the real master
    trainer.move_onto(guess, point=shot.current)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), guess[name])
    trainer.train(max_steps=2)
    progress = {n: p.detach().clone() - guess[n] for n, p in trainer.model.named_parameters()}
    new_master = {n: t + 0.01 for n, t in master.items()}
    kept = trainer.rebase(new_master, point=guess)
    # Assert: the steps taken from the guess are kept on the real master, and the round's delta is just them
    assert kept == 2  # the next round's stale steps
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), new_master[name] + progress[name])
    shot = trainer.take_snapshot()
    for name in new_master:
        torch.testing.assert_close(shot.base[name] - shot.current[name], -progress[name])


def test_training_stops_at_the_time_box_or_on_cancel_but_always_takes_one_step() -> None:
    trainer = LocalTrainer(CFG, public_key=b"\x04" * 32, device=torch.device("cpu"))
    trainer.start_round(snapshot(trainer.model, device="cpu"), round_index=0)
    calls = []

    trainer.train(max_steps=3, stop=lambda: calls.append(1) or len(calls) >= 2)

    assert trainer.round_steps == 2  # the stop is asked before every step but the first
    cancel = threading.Event()
    cancel.set()
    trainer.train(max_steps=3, cancel=cancel)
    assert trainer.round_steps == 2
    assert trainer.total_steps == 2 and trainer.total_compute_s > 0 and trainer.step_s is not None


def test_a_slowed_peer_takes_proportionally_longer_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record every sleep the trainer asks for and how long it really took
    slept: list[tuple[float, float]] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        started = time.monotonic()
        real_sleep(seconds)
        slept.append((seconds, time.monotonic() - started))

    monkeypatch.setattr(trainer_module.time, "sleep", sleep)
    slow = LocalTrainer(CFG, public_key=b"\x05" * 32, device=torch.device("cpu"), speed=0.25)
    slow.start_round(snapshot(slow.model, device="cpu"), round_index=0)
    # Execute
    slow.train(max_steps=3)
    # Assert: after each step it sleeps 3x the step's compute, so a step lasts 4x as long (however loaded the box)
    assert len(slept) == 3
    computed = slow.total_compute_s - sum(took for _, took in slept)
    assert sum(asked for asked, _ in slept) == pytest.approx(3 * computed, rel=0.15)  # a preemption can add a little
    assert slow.total_compute_s >= 4 * computed * 0.85
    with pytest.raises(ValueError, match="speed"):
        LocalTrainer(CFG, public_key=b"\x05" * 32, device=torch.device("cpu"), speed=0)
