"""The inner optimizer's state kept beside the identity: taken back by a restart of the same run, else ignored."""

import asyncio
import logging
from pathlib import Path

import pytest
import torch

from potluck.peer.inner_state import MAX_AGE_ROUNDS, StateWriter, load_state, save_state, state_file, state_tensors
from potluck.peer.trainer import LocalTrainer
from potluck.protocol.config import RunConfig
from potluck.training.diloco import snapshot

CFG = RunConfig(local_steps=3, rounds=40, inner={"warmup_steps": 1, "batch_size": 4}, data={"max_bytes": 300_000})
RUN = CFG.config_hash


def _trainer(key: int = 1) -> LocalTrainer:
    return LocalTrainer(CFG, public_key=bytes([key]) * 32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def trained() -> LocalTrainer:
    trainer = _trainer()
    trainer.train_round(snapshot(trainer.model, device="cpu"), round_index=0, time_budget_s=1e9)
    return trainer


def _moments(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return state_tensors(trainer.optimizer)


def test_the_state_file_sits_beside_the_identity_key() -> None:
    assert state_file(Path("/home/v/.potluck/identity.key")) == Path(
        "/home/v/.potluck/identity.inner-state.safetensors"
    )


def test_a_restart_of_the_same_run_takes_the_state_back(trained: LocalTrainer, tmp_path: Path) -> None:
    # Prepare: the state after round 5, a fresh trainer as a restart makes
    path = tmp_path / "identity.inner-state.safetensors"
    save_state(path, state_tensors(trained.optimizer), config_hash=RUN, round_index=5)
    fresh = _trainer()
    # Execute
    taken = load_state(path, fresh.optimizer, config_hash=RUN, round_index=7)
    # Assert: every moment and step is the trained one's, and the optimizer still steps
    assert taken
    before, after = _moments(trained), _moments(fresh)
    assert before.keys() == after.keys() and any(k.endswith("exp_avg_sq") for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh.train_round(snapshot(fresh.model, device="cpu"), round_index=7, time_budget_s=1e9)


@pytest.mark.parametrize(
    ("config", "saved_round", "now", "why"),
    [
        ("0" * 64, 5, 6, "another run's"),
        (RUN, 9, 6, "from round 9"),
        (RUN, 5, 6 + MAX_AGE_ROUNDS, f"from round 5, this run is at round {6 + MAX_AGE_ROUNDS}"),
    ],
)
def test_a_state_of_another_run_or_too_old_is_ignored(
    trained: LocalTrainer, tmp_path: Path, caplog: pytest.LogCaptureFixture, config: str, saved_round: int, now: int,
    why: str,
) -> None:  # fmt: skip
    path = tmp_path / "s.safetensors"
    save_state(path, state_tensors(trained.optimizer), config_hash=config, round_index=saved_round)
    fresh = _trainer()

    with caplog.at_level(logging.INFO, logger="potluck.peer.inner_state"):
        taken = load_state(path, fresh.optimizer, config_hash=RUN, round_index=now)

    assert not taken and fresh.optimizer.state_dict()["state"] == {}
    assert why in caplog.text and "starting it afresh" in caplog.text


def test_a_damaged_or_foreign_file_is_ignored_not_fatal(trained: LocalTrainer, tmp_path: Path) -> None:
    # Prepare: garbage bytes; a state missing a tensor; one whose tensor has another size; one with a NaN
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson" + b"\xff" * 64)
    tensors = state_tensors(trained.optimizer)
    missing = dict(tensors)
    missing.pop(next(iter(missing)))
    resized = dict(tensors) | {"0.exp_avg": torch.zeros(3)}
    poisoned = dict(tensors) | {"0.exp_avg": torch.full_like(tensors["0.exp_avg"], float("nan"))}
    paths = [garbage]
    for name, content in {"missing": missing, "resized": resized, "poisoned": poisoned}.items():
        save_state(tmp_path / name, content, config_hash=RUN, round_index=1)
        paths.append(tmp_path / name)
    # Execute / Assert
    for path in paths:
        fresh = _trainer()
        assert not load_state(path, fresh.optimizer, config_hash=RUN, round_index=2), path.name
        assert fresh.optimizer.state_dict()["state"] == {}


def test_a_disk_that_refuses_the_write_is_said_once_and_never_fatal(
    trained: LocalTrainer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a path whose directory does not exist stands for a full or read-only disk
    writer = StateWriter(tmp_path / "gone" / "s.safetensors", config_hash=RUN)

    async def three_rounds() -> None:
        for r in range(3):
            await writer.after_round(trained.optimizer, r)
            await writer.close()

    # Execute
    with caplog.at_level(logging.WARNING, logger="potluck.peer.inner_state"):
        asyncio.run(three_rounds())
    # Assert
    assert writer.failed
    assert caplog.text.count("not saved") == 1
    assert not list(tmp_path.rglob("*.partial"))


def test_the_writer_keeps_the_latest_round(trained: LocalTrainer, tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    writer = StateWriter(path, config_hash=RUN)

    async def two_rounds() -> None:
        await writer.after_round(trained.optimizer, 3)
        await writer.close()
        await writer.after_round(trained.optimizer, 4)
        await writer.close()

    asyncio.run(two_rounds())

    fresh = _trainer()
    assert load_state(path, fresh.optimizer, config_hash=RUN, round_index=4)
    assert not load_state(path, _trainer().optimizer, config_hash=RUN, round_index=3)  # round 4's, not 3's
