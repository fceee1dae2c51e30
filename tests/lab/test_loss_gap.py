import json
from pathlib import Path

import pytest

from bench.loss_gap import main, summarize


def test_the_smallest_loss_gap_run_writes_every_arm_and_both_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    out = tmp_path / "gap.jsonl"
    main(
        [
            *("--peers", "2", "--rounds", "2", "--local-steps", "2", "--batch-size", "2", "--seeds", "0"),
            *("--ddp-lrs", "0.001,0.003", "--warm", "0.5", "--dropout", "--eval-batches", "1", "--device", "cpu"),
            *("--noise-samples", "4", "--densities", "0.25", "--out", str(out)),
        ]
    )
    # Assert: (cold, warm) x (2 DDP + 5 DiLoCo arms + the default at 1/4), the dropout arm, a table for each start
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 17
    assert {r["arm"] for r in records} == {
        *("ddp@0.001", "ddp@0.003", "diloco-nesterov", "diloco-average", "sparseloco", "potluck-default"),
        *("potluck-average", "potluck@0.25", "potluck-default+drop50"),
    }
    assert {r["warm_steps"] for r in records if r["warm"]} == {2}
    printed = capsys.readouterr().out
    assert "gradient noise scale at the warm start" in printed
    assert "**from scratch**" in printed and "**warm-started**" in printed and "at equal tokens" in printed
    dropped = next(r for r in records if r["arm"] == "potluck-default+drop50")
    assert len(dropped["val_loss_per_round"]) == 3  # 2 planned, then 1 for the peer left to make up its share
    # and the tables come back from the JSON lines alone
    main(["--tables", str(out)])
    reprinted = capsys.readouterr().out
    assert "| potluck@0.25 | 1 |" in reprinted and "**warm-started**" in reprinted and "at equal tokens" in reprinted


def test_the_baseline_is_the_ddp_arm_with_the_lowest_mean_and_gaps_are_paired_per_seed() -> None:
    # Prepare: the slower lr wins on average; the DiLoCo arm is 10% above it on seed 0 and 20% on seed 1
    runs = [
        ("ddp@1", 0, 2.0), ("ddp@1", 1, 2.2), ("ddp@2", 0, 2.1), ("ddp@2", 1, 2.3),
        ("diloco", 0, 2.2), ("diloco", 1, 2.64),
    ]  # fmt: skip
    records = [
        {"arm": a, "seed": s, "val_loss": v, "warm": False, "up_bytes_per_param_per_kstep": 1.0} for a, s, v in runs
    ]
    # Execute
    baseline, summaries = summarize(records, warm=False)
    # Assert
    assert baseline == "ddp@1"
    diloco = next(s for s in summaries if s.arm == "diloco")
    assert diloco.gap_pct == pytest.approx(15.0)
    assert diloco.gap_half_width == pytest.approx(12.706 * 5.0, rel=1e-3)  # t(0.975, 1) x stdev 7.07 / sqrt 2
