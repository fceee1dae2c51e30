"""The capacity model (bench/capacity.py): fitted from load results, and the shard count it answers with."""

import json
from pathlib import Path

from bench.capacity import Point, fit, load_point, shards_needed


def _point(directory: Path, *, shards: int, m: float, n: int, per_m: float) -> Point:
    """A load result as bench/load.py writes it (a warm-up and a measured round), read back: `m` M params owned,
    `n` identities, 0.1 s + `per_m` s per M params of work per identity, 100 MB + 10 MB per M base RSS and 4 MB per
    M per identity."""
    row = {"density": 0.015625, "upload_bytes": 1000, "cpu": 1.0}
    row |= {"round_s": (0.1 + per_m * m) * n, "rss_mb": 100 + 10 * m + n * 4 * m}
    result = {"model": f"{m}M", "shards": shards, "num_params": int(m * 1e6), "identities": n}
    result["rounds"] = [row | {"warmup": True}, row | {"warmup": False}]
    path = directory / f"{m}-{shards}-{n}.json"
    path.write_text(json.dumps(result))
    return load_point(path)


def _points(directory: Path) -> list[Point]:
    """0.2 s per M params with the held-out check (one shard), 0.05 s without (2 and 4 shards)."""
    one = [_point(directory, shards=1, m=m, n=n, per_m=0.2) for m in (1, 10) for n in (10, 100)]
    return one + [_point(directory, shards=s, m=10 / s, n=100, per_m=0.05) for s in (2, 4)]


def test_the_fit_goes_through_its_points_and_names_what_binds(tmp_path: Path) -> None:
    # Act
    model = fit(_points(tmp_path))
    answer = shards_needed(model, params=1e9, volunteers=1000, round_s=1000, memory_gb=64)

    # Assert: the lines through the points, and the fewest shards whose memory and CPU both hold
    (a, b), (a_off, b_off) = model.wall[True], model.wall[False]
    assert abs(a - 0.1) < 1e-9 and abs(b - 0.2e-6) < 1e-12 and abs(a_off - 0.1) < 1e-9 and abs(b_off - 0.05e-6) < 1e-12
    assert abs(model.memory[1] - 4e-6) < 1e-12 and abs(model.base[0] - 100) < 1e-6
    s = answer["shards"]
    assert answer["binds"] == "memory" and s == answer["shards_for_memory"] > answer["shards_for_cpu"]
    assert model.base_mb(1e9 / s) + 1000 * model.memory_mb(1e9 / s) <= 64 * 1024
    assert model.base_mb(1e9 / (s - 1)) + 1000 * model.memory_mb(1e9 / (s - 1)) > 64 * 1024
    assert 1000 * model.wall_s(1e9 / s, held_out=False) <= 1000


def test_a_round_shorter_than_the_fixed_work_per_volunteer_has_no_shard_count(tmp_path: Path) -> None:
    # Arrange: 0.1 s of fixed work for each of 10,000 volunteers is 1,000 s, twice the round
    model = fit(_points(tmp_path))

    # Act
    answer = shards_needed(model, params=1e9, volunteers=10_000, round_s=500, memory_gb=64)

    # Assert
    assert answer["shards"] is None and answer["binds"].startswith("CPU")
