"""The probe and `potluck doctor` against real p2pd daemons on localhost.

A "server" P2P serves `handle_probe` the way aggregator-server registers it; the client side is
`measure_rates`, then the whole `run_doctor` (run in a worker thread, since it runs its own event loop
while the server's loop keeps serving in this one). No p2pd may outlive a test.
"""

import asyncio
import json
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from typing import TypeVar

import pytest

with warnings.catch_warnings():
    # `import hivemind` runs torch.jit.script at import time, which recent torch deprecates (see test_p2p_streams).
    warnings.simplefilter("ignore", DeprecationWarning)
    from hivemind.p2p import P2P, PeerID

from potluck.aggregator_server.probe_handler import PROBE_HANDLER, handle_probe
from potluck.cli.preflight import ProbeUnavailableError, measure_link, measure_rates, run_doctor
from potluck.protocol.wire import MessageKind, PeerRefusedError, read_frame_from_stream, write_frame
from tests.integration.swarm_helpers import p2pd_children
from tests.local_http import local_page

pytestmark = pytest.mark.network

T = TypeVar("T")


def _run(coro: Awaitable[T], *, timeout_s: float = 50) -> T:
    """Run one test coroutine on a fresh event loop (pytest-asyncio is not a dependency)."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def _random_peer_id() -> PeerID:
    """A well-formed peer id nobody has: an identity multihash of a random Ed25519 public key."""
    ed25519_public_key_protobuf = b"\x08\x01\x12\x20" + os.urandom(32)  # KeyType=Ed25519, 32-byte key
    return PeerID(b"\x00" + bytes([len(ed25519_public_key_protobuf)]) + ed25519_public_key_protobuf)


@asynccontextmanager
async def _server(*, serve_probe: bool, handler: Callable = handle_probe) -> AsyncIterator[tuple[P2P, str]]:
    """A P2P that serves the probe (or not), with its /p2p/ address; shut down on exit, whatever happens."""
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        if serve_probe:
            await server.add_binary_stream_handler(PROBE_HANDLER, handler)
        yield server, str((await server.get_visible_maddrs())[0])
    finally:
        await server.shutdown()


@asynccontextmanager
async def _client_of(address: str) -> AsyncIterator[P2P]:
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[address])
    try:
        yield client
    finally:
        await client.shutdown()


@pytest.mark.timeout(60)
def test_measure_rates_against_a_real_probe_handler() -> None:
    async def scenario() -> tuple[float, float]:
        async with _server(serve_probe=True) as (server, address), _client_of(address) as client:
            return await measure_rates(
                client, server.peer_id, upload_bytes=3 * 1024 * 1024, download_bytes=1024 * 1024, timeout_s=20
            )

    upload_bytes_per_s, download_bytes_per_s = _run(scenario())
    assert upload_bytes_per_s > 0 and download_bytes_per_s > 0
    assert p2pd_children() == []


@pytest.mark.timeout(60)
def test_measure_link_dials_an_address_and_measures_both_directions() -> None:
    async def scenario() -> tuple[float, float]:
        async with _server(serve_probe=True) as (_, address):
            return await measure_link(address, timeout_s=20)

    upload_bytes_per_s, download_bytes_per_s = _run(scenario())
    assert upload_bytes_per_s > 0 and download_bytes_per_s > 0
    assert p2pd_children() == []


@pytest.mark.timeout(60)
def test_a_malformed_probe_gets_an_error_frame() -> None:
    async def scenario() -> None:
        async with _server(serve_probe=True) as (server, address), _client_of(address) as client:
            _, reader, writer = await client.call_binary_stream_handler(server.peer_id, PROBE_HANDLER)
            try:
                await write_frame(writer, kind=MessageKind.PROBE, body=b"\x00\x00\x00\x05abc")
                with pytest.raises(PeerRefusedError, match="past the body end"):
                    await asyncio.wait_for(
                        read_frame_from_stream(reader, max_body_bytes=1024, expected_kinds={MessageKind.PROBE_REPLY}),
                        20,
                    )
            finally:
                writer.close()

    _run(scenario())
    assert p2pd_children() == []


@pytest.mark.timeout(60)
def test_a_peer_without_the_probe_handler_is_reported_as_such() -> None:
    async def scenario() -> None:
        async with _server(serve_probe=False) as (server, address), _client_of(address) as client:
            with pytest.raises(ProbeUnavailableError, match="does not serve potluck.probe"):
                await measure_rates(client, server.peer_id, upload_bytes=1, download_bytes=1, timeout_s=20)

    _run(scenario())
    assert p2pd_children() == []


def _doctor(
    join: list[str],
    *,
    serve_probe: bool,
    timeout_s: float,
    capsys: pytest.CaptureFixture[str],
    handler: Callable = handle_probe,
):
    """`run_doctor(as_json=True)` with "{server}" in `join` replaced by a live local server's address.

    Returns (exit status, the JSON report by check name, seconds run_doctor took).
    """

    async def scenario() -> tuple[int, float]:
        async with _server(serve_probe=serve_probe, handler=handler) as (_, address):
            started = time.monotonic()
            addresses = [entry.replace("{server}", address) for entry in join]
            code = await asyncio.to_thread(run_doctor, join=addresses, as_json=True, timeout_s=timeout_s)
            return code, time.monotonic() - started

    code, elapsed_s = _run(scenario())
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is (code == 0)
    return code, {check["name"].split()[0]: check for check in report["checks"]}, elapsed_s


@pytest.mark.timeout(60)
def test_doctor_against_a_live_aggregator_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, checks, _ = _doctor(["{server}"], serve_probe=True, timeout_s=20, capsys=capsys)
    assert code == 0
    assert checks["p2pd"]["status"] == checks["join"]["status"] == checks["rates"]["status"] == "ok", checks
    assert "Mbit/s" in checks["rates"]["detail"]
    assert checks["reachability"]["status"] in {"ok", "warning"}  # no public address on CI is fine
    assert p2pd_children() == []


def _dropping_probes(how_many: int) -> Callable:
    """A probe handler that closes its first `how_many` streams unanswered, then serves like the real one."""
    dropped = 0

    async def handler(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dropped
        if dropped < how_many:
            dropped += 1
            writer.close()
            return
        await handle_probe(stream_info, reader, writer)

    return handler


@pytest.mark.timeout(60)
def test_doctor_tries_a_dropped_probe_once_more_and_warns_only_when_it_drops_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, checks, _ = _doctor(["{server}"], serve_probe=True, timeout_s=20, capsys=capsys, handler=_dropping_probes(1))
    assert (code, checks["rates"]["status"]) == (0, "ok"), checks
    code, checks, _ = _doctor(["{server}"], serve_probe=True, timeout_s=20, capsys=capsys, handler=_dropping_probes(2))
    assert (code, checks["rates"]["status"]) == (0, "warning"), checks
    assert "probe reply ended" in checks["rates"]["detail"]
    assert p2pd_children() == []


def _join_page(maddr: str) -> AbstractContextManager[str]:
    """A local page serving `/api/join` the way the aggregator's status page does (404 elsewhere)."""
    body = json.dumps({"run": "t", "fingerprint": None, "maddrs": [maddr]}).encode()
    return local_page(lambda path, n: (200, body) if path == "/api/join" else (404, b"{}"))


@pytest.mark.timeout(60)
def test_doctor_given_a_status_page_url_finds_the_aggregator_through_it(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> int:
        async with _server(serve_probe=True) as (_, address):
            with _join_page(address) as url:
                return await asyncio.to_thread(run_doctor, join=[url], as_json=True, timeout_s=20)

    code = _run(scenario())
    checks = {check["name"].split()[0]: check for check in json.loads(capsys.readouterr().out)["checks"]}
    assert code == 0, checks
    assert checks["page"]["status"] == checks["join"]["status"] == checks["rates"]["status"] == "ok", checks
    assert p2pd_children() == []


@pytest.mark.timeout(60)
def test_doctor_reports_a_page_that_is_not_an_aggregators_as_a_problem(capsys: pytest.CaptureFixture[str]) -> None:
    with _join_page("unused") as url:
        code = run_doctor(join=[url + "/elsewhere"], as_json=True, timeout_s=5)
    checks = {check["name"].split()[0]: check for check in json.loads(capsys.readouterr().out)["checks"]}
    assert code == 1
    assert checks["page"]["status"] == "problem" and "HTTP 404" in checks["page"]["detail"], checks
    assert "join" not in checks


@pytest.mark.timeout(60)
def test_doctor_warns_when_the_peer_serves_no_probe(capsys: pytest.CaptureFixture[str]) -> None:
    code, checks, _ = _doctor(["{server}"], serve_probe=False, timeout_s=20, capsys=capsys)
    assert (checks["join"]["status"], checks["rates"]["status"]) == ("ok", "warning")
    assert "not a potluck aggregator" in checks["rates"]["detail"]
    assert p2pd_children() == []


@pytest.mark.timeout(60)
def test_doctor_reports_an_unreachable_aggregator_as_a_problem_within_the_timeout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    nobody = f"/ip4/127.0.0.1/tcp/1/p2p/{_random_peer_id()}"  # port 1: nothing listens, the dial is refused
    code, checks, elapsed_s = _doctor([nobody], serve_probe=False, timeout_s=10, capsys=capsys)
    assert code == 1
    assert checks["join"]["status"] == "problem"
    assert "cannot reach the aggregator" in checks["join"]["detail"] and "aggregator-server" in checks["join"]["fix"]
    assert "rates" not in checks
    assert elapsed_s < 2 * 10  # the p2pd check and the dial, each bounded by timeout_s
    assert p2pd_children() == []
