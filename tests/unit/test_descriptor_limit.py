"""A node raises its soft open-file limit to the hard one, so a flood of connections cannot starve its streams."""

import resource

import pytest

from potluck.cli.process import raise_descriptor_limit, raised_descriptor_limit

UNLIMITED = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("soft", "hard", "wanted"),
    [
        (1024, 524288, 524288),  # a common Linux default: raised to the hard limit
        (4096, 4096, 4096),  # already there
        (256, UNLIMITED, 10240),  # macOS: an unlimited hard limit is not a value setrlimit takes for files
        (20000, UNLIMITED, 20000),  # never lowered
        (UNLIMITED, UNLIMITED, UNLIMITED),
    ],
)
def test_the_soft_limit_asked_for(soft: int, hard: int, wanted: int) -> None:
    # Execute / Assert
    assert raised_descriptor_limit(soft, hard, unlimited=UNLIMITED) == wanted


def test_raising_the_limit_sets_the_soft_limit_to_the_hard_one() -> None:
    # Prepare: start below the hard limit, as a fresh process on many systems does
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    lowered = 512 if hard == UNLIMITED else min(512, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        # Execute
        raised = raise_descriptor_limit()
        after = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
    # Assert
    expected = raised_descriptor_limit(lowered, hard, unlimited=UNLIMITED)
    assert after == (expected, hard)
    assert raised == (None if expected == lowered else expected)
