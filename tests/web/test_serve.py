"""start_server: uvicorn as a task in the caller's loop, leaving the host's signals alone."""

import asyncio
import signal
import socket

import httpx
import pytest
from fastapi import FastAPI

from potluck.web import RunStatus, WebServerError, create_app, start_server
from potluck.web.serve import RunningServer
from tests.web.events import ready


def _app() -> FastAPI:
    status = RunStatus()
    status.handle(ready())
    return create_app(status)


def test_a_server_on_port_0_answers_over_http_and_stops() -> None:
    # Prepare
    async def scenario() -> tuple[int, dict[str, object], int, str]:
        running = await start_server(_app(), host="127.0.0.1", port=0)
        async with httpx.AsyncClient(trust_env=False) as http:
            response = await http.get(f"{running.url}/api/health")
        await running.stop()
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(trust_env=False) as http:
                await http.get(f"{running.url}/api/health")
        return response.status_code, response.json(), running.port, running.url

    # Execute
    status_code, body, port, url = asyncio.run(scenario())
    # Assert
    assert status_code == 200 and body == {"ok": True, "phase": "collecting", "round": 0}
    assert port > 0 and url == f"http://127.0.0.1:{port}"


def test_a_busy_port_is_one_clear_line() -> None:
    # Prepare
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        # Execute
        async def scenario() -> None:
            await start_server(_app(), host="127.0.0.1", port=port)

        with pytest.raises(WebServerError) as caught:
            asyncio.run(scenario())
    # Assert
    message = str(caught.value)
    assert message == (
        f"cannot serve the status page on 127.0.0.1:{port}: address already in use; "
        "pass --http-port 0 to disable it or another port"
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_the_host_process_keeps_its_signal_handlers() -> None:
    # Prepare
    def on_signal(signum: int, frame: object) -> None:
        raise AssertionError("not expected to run")

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:

        async def scenario() -> tuple[object, object]:
            running = await start_server(_app(), host="127.0.0.1", port=0)
            async with httpx.AsyncClient(trust_env=False) as http:
                await http.get(f"{running.url}/api/health")
            while_serving = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
            await running.stop()
            return while_serving

        # Execute
        while_serving = asyncio.run(scenario())
        after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    # Assert
    assert while_serving == (on_signal, on_signal)
    assert after == (on_signal, on_signal)


@pytest.mark.parametrize(
    ("host", "url"),
    [("127.0.0.1", "http://127.0.0.1:8000"), ("0.0.0.0", "http://127.0.0.1:8000"), ("::", "http://[::1]:8000")],
)
def test_the_url_points_a_local_browser_at_the_page(host: str, url: str) -> None:
    # Prepare
    running = RunningServer(server=None, task=None, host=host, port=8000)  # type: ignore[arg-type]
    # Execute, Assert
    assert running.url == url
