import math

import pytest
import torch

from potluck.planning.simulate import Dropout, run_ddp, run_diloco, warm_start
from potluck.protocol.codecs import make_codec
from potluck.protocol.config import RunConfig
from potluck.tasks import run_task

CFG = RunConfig().with_overrides(
    {"model.size": "tiny", "rounds": 4, "local_steps": 3, "inner.batch_size": 2, "inner.warmup_steps": 2}
)
CPU = torch.device("cpu")


def _setup() -> tuple[object, list[object]]:
    task = run_task(CFG)
    return task, task.held_out_batches(batch_size=2, count=2)


def test_ddp_from_its_own_checkpoint_ends_where_the_whole_run_ends() -> None:
    # Prepare
    task, eval_set = _setup()
    whole = run_ddp(CFG, peers=2, task=task, eval_set=eval_set, device=CPU)
    # Execute: the first two rounds as a checkpoint, then the rest from it
    warm = warm_start(CFG, peers=2, task=task, device=CPU, steps=2 * CFG.local_steps)
    rest = run_ddp(CFG, peers=2, task=task, eval_set=eval_set, device=CPU, warm=warm)
    # Assert: the same steps on the same batches with the same optimizer state
    assert len(rest.val_loss_per_round) == 2
    assert rest.val_loss_per_round == pytest.approx(whole.val_loss_per_round[2:], abs=1e-5)


def test_diloco_warm_started_trains_only_the_rounds_left_from_the_checkpoint() -> None:
    # Prepare
    task, eval_set = _setup()
    warm = warm_start(CFG, peers=2, task=task, device=CPU, steps=3 * CFG.local_steps)
    none = make_codec("none", {})
    # Execute
    arm = run_diloco(
        CFG, label="x", peers=2, codec=none, aggregate_codec=none, task=task, eval_set=eval_set, device=CPU, warm=warm
    )
    # Assert: one round left, and it starts from the checkpoint, far below a fresh model's ~ln(256)
    assert len(arm.val_loss_per_round) == 1
    assert math.isfinite(arm.val_loss) and arm.val_loss < math.log(256) - 0.5


def test_a_warm_start_must_be_whole_rounds_short_of_the_run() -> None:
    task, _ = _setup()
    for steps in (0, 4, CFG.rounds * CFG.local_steps):
        with pytest.raises(ValueError, match="whole rounds"):
            warm_start(CFG, peers=2, task=task, device=CPU, steps=steps)


def test_peers_that_leave_mid_run_send_nothing_after_and_the_rest_make_up_the_rounds() -> None:
    # Prepare
    task, eval_set = _setup()
    none = make_codec("none", {})

    def arm(dropout: Dropout | None) -> object:
        return run_diloco(
            CFG, label="x", peers=2, codec=none, aggregate_codec=none, task=task, eval_set=eval_set, device=CPU,
            dropout=dropout,
        )  # fmt: skip

    # Execute: one of the two peers leaves after round 2 of 4; the other trains 2 rounds more
    calm, hit = arm(None), arm(Dropout(at_round=2, peers_left=1, extra_rounds=2))
    # Assert: the first two rounds are the same run, the rest is another, and 6 rounds were evaluated
    assert hit.val_loss_per_round[:2] == pytest.approx(calm.val_loss_per_round[:2], abs=1e-6)
    assert hit.val_loss_per_round[2] != pytest.approx(calm.val_loss_per_round[2], abs=1e-6)
    assert len(hit.val_loss_per_round) == 6
    assert hit.upload_bytes_per_peer_per_step == pytest.approx(calm.upload_bytes_per_peer_per_step, rel=0.05)
