"""A peer's first join is retried within its --join-timeout: its --join node may be an aggregator restarting."""

import asyncio

import pytest

from potluck.peer import runner
from potluck.protocol.node import JoinError


def test_a_join_refused_while_the_aggregator_restarts_is_retried_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the first bootstrap finds nobody (the aggregator is down), the second joins
    monkeypatch.setattr(runner, "JOIN_RETRY_BASE_S", 0.01)
    budgets: list[float] = []
    joined = object()

    async def start(timeout_s: float) -> object:
        budgets.append(timeout_s)
        if len(budgets) == 1:
            raise JoinError("could not join through ADDR: none of the initial_peers responded to a ping")
        return joined

    # Execute
    node = asyncio.run(runner.join_within(60.0, start))  # type: ignore[arg-type]
    # Assert: joined on the second try, each try within what is left of the timeout
    assert node is joined
    assert len(budgets) == 2 and 55.0 < budgets[1] <= budgets[0] <= 60.0


def test_a_join_that_keeps_failing_gives_up_with_its_last_error_at_the_timeout() -> None:
    attempts = 0

    async def start(timeout_s: float) -> object:
        nonlocal attempts
        attempts += 1
        raise JoinError(f"could not join through ADDR (try {attempts})")

    with pytest.raises(JoinError, match="try 1"):
        asyncio.run(runner.join_within(1.0, start))  # type: ignore[arg-type]
