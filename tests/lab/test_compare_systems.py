"""The rematch's arithmetic: DDP's targets, interpolated times to them, and ratios paired per seed."""

import pytest

from bench.compare_systems import loss_at_step, over_seeds, seed_targets, summarize, time_to


def _evals(*points: tuple[float, float, int]) -> list[dict[str, float]]:
    return [{"t": t, "val_loss": v, "step": s} for t, v, s in points]


def test_ddps_targets_are_its_losses_at_half_three_quarters_and_all_of_its_steps() -> None:
    # Prepare: DDP evaluated every 10 of its 40 steps, from 4.0 at step 0
    ddp = {
        "system": "ddp",
        "initial_val_loss": 4.0,
        "evals": _evals((5, 3.0, 10), (9, 2.6, 20), (13, 2.4, 30), (17, 2.0, 40)),
    }
    other = {"system": "potluck", "evals": _evals((6, 1.0, 10))}
    # Execute
    targets = seed_targets([other, ddp], total_steps=40, target=None)
    # Assert: steps 20, 30 and 40 fall on evaluations; a step between two is interpolated
    assert targets == [2.6, 2.4, 2.0]
    assert loss_at_step(4.0, ddp["evals"], 15) == pytest.approx(2.8)
    assert loss_at_step(4.0, ddp["evals"], 5) == pytest.approx(3.5)
    assert loss_at_step(4.0, ddp["evals"], 41) is None
    assert seed_targets([other, ddp], total_steps=40, target=1.5) == [1.5]


def test_time_to_a_target_is_interpolated_between_the_evaluations_around_its_first_crossing() -> None:
    # Prepare: 3.0 at 10 s, 2.0 at 20 s, back up to 2.5 at 30 s, 1.0 at 40 s
    evals = _evals((10, 3.0, 1), (20, 2.0, 2), (30, 2.5, 3), (40, 1.0, 4))
    # Execute and assert
    assert time_to(evals, 2.5) == pytest.approx(15.0)  # halfway from 3.0 to 2.0
    assert time_to(evals, 3.5) == 10.0  # already below at the first evaluation
    assert time_to(evals, 1.5) == pytest.approx(30 + 10 / 1.5)  # after the bounce, between 2.5 and 1.0
    assert time_to(evals, 0.5) is None


def test_ratios_to_the_reference_are_paired_per_seed_and_unreached_targets_are_counted() -> None:
    # Prepare: on seed 0 the slow system takes twice potluck's time to the target; on seed 1 it never gets there
    results = []
    for seed, slow_loss in ((0, 2.0), (1, 3.0)):
        potluck = {"system": "potluck", "seed": seed, "evals": _evals((10 * (seed + 1), 2.0, 1)), "peers": []}
        slow = {"system": "slow", "seed": seed, "evals": _evals((20, slow_loss, 1)), "peers": []}
        summarize([potluck, slow], targets=[2.5])
        results += [potluck, slow]
    # Execute
    table = over_seeds(results, reference="potluck")
    # Assert: one seed of two reached, at 2x the reference's time on that seed; the reference is 1x on both
    slow_row = next(line for line in table.splitlines() if line.startswith("| slow "))
    assert "| 20.0 (1/2 reached) |" in slow_row and "| 2.00 |" in slow_row, slow_row
    potluck_row = next(line for line in table.splitlines() if line.startswith("| potluck "))
    assert "| 15.0 ± 63.5 |" in potluck_row and "| 1.00 ± 0.00 |" in potluck_row, potluck_row
