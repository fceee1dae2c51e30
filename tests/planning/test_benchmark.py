"""The self-benchmark behind `potluck plan --auto`: a step time and the round's payload sizes."""

import torch

from potluck.planning.benchmark import density_options, measure_step_seconds, payload_bytes
from potluck.protocol.config import RunConfig
from potluck.training.models import count_params, model_config


def test_a_step_of_the_tiny_model_takes_a_positive_time_under_a_few_seconds() -> None:
    step_s = measure_step_seconds(RunConfig(), device=torch.device("cpu"), steps=1)

    assert 0 < step_s < 5


def test_payload_sizes_of_a_small_model_are_its_codecs_own_encodings() -> None:
    cfg = RunConfig().with_overrides({"codec": {"name": "fp16"}, "aggregate_codec": {"name": "int8"}}, source="test")
    params = count_params(model_config("tiny"))

    upload, download = payload_bytes(cfg)

    assert 2 * params <= upload < 2 * params + 4096  # fp16: two bytes a parameter plus headers
    assert params <= download < 1.05 * params  # int8: one byte a parameter plus scales


def test_denser_codes_cost_more_bytes_and_a_code_without_a_density_offers_none() -> None:
    options = density_options(RunConfig())

    sizes = [options[d] for d in sorted(options)]
    assert len(sizes) >= 4
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(sizes, sizes[1:], strict=False))
    assert options[1 / 64] == payload_bytes(RunConfig())  # the default run's own density
    fp16 = RunConfig().with_overrides({"codec": {"name": "fp16"}, "aggregate_codec": {"name": "fp16"}}, source="test")
    assert density_options(fp16) == {}
