"""A standby follows its primary's refusal codes, whatever the refusal's words say."""

import asyncio
from types import SimpleNamespace

import pytest

from potluck.aggregator_server import standby as standby_module
from potluck.aggregator_server.standby import Standby
from potluck.protocol.client import AggregatorRefused
from potluck.protocol.wire import RefusalCode


def _standby(script: list[AggregatorRefused], calls: list[str]) -> Standby:
    """A standby whose link answers from `script`, in order, and notes whether it downloaded or followed."""

    async def on_state(master: object, body: bytes | None) -> None:
        pass

    s = Standby(
        SimpleNamespace(rounds=10),  # type: ignore[arg-type]
        node=SimpleNamespace(),  # type: ignore[arg-type]
        own_key=bytes(32),
        primary=bytes(range(32)),
        master=SimpleNamespace(round=3),  # type: ignore[arg-type]
        failover_after_s=60,
        on_state=on_state,
        on_event=lambda event: None,
    )
    s._link = object()  # type: ignore[assignment]
    s._synced = True

    async def answer(what: str) -> None:
        calls.append(what)
        raise script.pop(0)

    s._download = lambda link: answer("download")  # type: ignore[method-assign]
    s._next_aggregate = lambda link: answer("aggregate")  # type: ignore[method-assign]
    return s


def test_run_finished_ends_the_standby_whatever_the_words(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(standby_module, "RETRY_S", 0.0)
    calls: list[str] = []
    s = _standby([AggregatorRefused("round 3 is no longer held; still open", code=RefusalCode.RUN_FINISHED)], calls)
    # Execute
    result = asyncio.run(s.follow())
    # Assert
    assert result is None and calls == ["aggregate"]


def test_not_held_downloads_the_state_again_whatever_the_words(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(standby_module, "RETRY_S", 0.0)
    calls: list[str] = []
    script = [
        AggregatorRefused("the run has finished", code=RefusalCode.NOT_HELD),
        AggregatorRefused("anything at all", code=RefusalCode.RUN_FINISHED),
    ]
    s = _standby(script, calls)
    # Execute
    result = asyncio.run(s.follow())
    # Assert
    assert result is None and calls == ["aggregate", "download"]


def test_an_unspecified_refusal_is_retried_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(standby_module, "RETRY_S", 0.0)
    calls: list[str] = []
    script = [
        AggregatorRefused("run 'x' has finished at round 3; no longer held"),
        AggregatorRefused("", code=RefusalCode.RUN_FINISHED),
    ]
    s = _standby(script, calls)
    # Execute
    result = asyncio.run(s.follow())
    # Assert
    assert result is None and calls == ["aggregate", "aggregate"]
