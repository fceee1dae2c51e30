"""The self-benchmark behind `potluck plan --auto`: a step time and the round's payload sizes."""

import torch

from potluck.protocol.config import RunConfig
from potluck.training.benchmark import measure_step_seconds, payload_bytes
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
