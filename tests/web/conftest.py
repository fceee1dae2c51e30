"""Fixtures for the web tests: a hand-set clock and a RunStatus fed a realistic two-round run."""

import warnings

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from potluck.web import RunStatus, create_app
from tests.web.events import T0_S, two_rounds

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 fork for its TestClient and warns, once, on import when only
    # httpx is installed; the client works the same with either.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient


class FakeClock:
    """A clock the test moves by hand: `clock.now_s = ...`."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0_S + 130.0)  # 10 s into round 2, which opened at T0_S + 120


@pytest.fixture
def run_status(clock: FakeClock) -> RunStatus:
    status = RunStatus(clock=clock)
    for event in two_rounds():
        status.handle(event)
    return status


@pytest.fixture
def client(run_status: RunStatus) -> TestClient:
    return TestClient(create_app(run_status))
