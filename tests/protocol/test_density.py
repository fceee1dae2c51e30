"""The run's density ladder and the codecs each step gives (protocol/density.py)."""

import pytest

from potluck.protocol.config import RunConfig
from potluck.protocol.density import density_ladder, density_problem, round_codecs, start_density


def test_the_default_run_adapts_from_its_codecs_density_by_doublings_up_to_max_density() -> None:
    cfg = RunConfig()

    assert start_density(cfg) == 1 / 64
    assert density_ladder(cfg) == (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_density": None},  # adaptation off
        {"max_density": 0.01},  # at or below the codec's own: nothing to climb
        {"codec.params.density": 0.5, "max_density": 0.75},  # the next doubling would pass max_density
    ],
)
def test_a_run_that_cannot_climb_keeps_its_codecs_density(overrides: dict[str, object]) -> None:
    cfg = RunConfig().with_overrides(overrides, source="test")

    assert density_ladder(cfg) == (start_density(cfg),)


def test_a_codec_without_density_has_density_zero_and_its_own_codecs() -> None:
    cfg = RunConfig().with_overrides({"codec": {"name": "int8"}, "aggregate_codec": {"name": "fp16"}}, source="test")

    upload, download = round_codecs(cfg, 0.0)

    assert density_ladder(cfg) == (0.0,)
    assert (upload.name, download.name) == ("int8", "fp16")


def test_round_codecs_keep_the_aggregates_ratio_to_the_upload_at_most_one() -> None:
    cfg = RunConfig()  # upload 1/64, aggregate 1/16: 4x

    for density, expected in [(1 / 64, 1 / 16), (1 / 8, 1 / 2), (1 / 2, 1.0)]:
        upload, download = round_codecs(cfg, density)
        assert (upload.params["density"], download.params["density"]) == (density, expected)
        assert (upload.params["bits"], upload.params["ef_decay"]) == (2, 0.9)  # the rest of the codec stays


@pytest.mark.parametrize("density", [0.3, 1.0, 0.0, 1 / 128])
def test_a_density_off_the_ladder_is_named_and_refused(density: float) -> None:
    cfg = RunConfig()

    problem = density_problem(cfg, density)

    assert problem is not None and repr(density) in problem and "0.015625, 0.03125" in problem
    with pytest.raises(ValueError, match="not one the run config allows"):
        round_codecs(cfg, density)
