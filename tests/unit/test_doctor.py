"""`potluck doctor` without a network: address parsing, the disk and device checks, the report's shapes.

The p2pd start is replaced by a fake node here (tests/integration/test_probe.py runs the real one), so
these tests start no process and finish in seconds.
"""

import asyncio
import json
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

with warnings.catch_warnings():
    # `import hivemind` runs torch.jit.script at import time, which recent torch deprecates (see test_p2p_streams).
    warnings.simplefilter("ignore", DeprecationWarning)
    from hivemind.p2p import PeerID
    from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerInfo
    from hivemind.utils.multiaddr import Multiaddr

from potluck.cli import preflight
from potluck.cli.preflight import Status, check_device, check_disk, parse_join_address, run_doctor

PEER_ID = "12D3KooWQFg4b9NM1qpzNirUdP9zjSgvbLJNwE9K8bWUuiw3HmGg"


class _FakeP2P:
    """Stands in for a started hivemind P2P: only what the p2pd and reachability checks ask of it."""

    def __init__(self, visible: list[str]) -> None:
        self.visible = [Multiaddr(address) for address in visible]

    async def get_visible_maddrs(self, latest: bool = False) -> list[Multiaddr]:
        return self.visible


@pytest.fixture
def fake_p2pd(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the p2pd start with a fake node on a private address; records each start's keyword arguments."""
    starts: list[dict[str, Any]] = []

    @asynccontextmanager
    async def fake_running_p2p(*, timeout_s: float, **p2p_kwargs: Any) -> AsyncIterator[_FakeP2P]:
        starts.append(p2p_kwargs)
        yield _FakeP2P([f"/ip4/192.168.1.5/tcp/4000/p2p/{PEER_ID}"])

    monkeypatch.setattr(preflight, "_running_p2p", fake_running_p2p)
    return starts


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("/ip4/1.2.3/tcp/x", "'/ip4/1.2.3/tcp/x' is not a valid multiaddr: protocol ip4: base address '1.2.3'"),
        ("127.0.0.1:4000", "'127.0.0.1:4000' is not a valid multiaddr"),
        ("/ip4/127.0.0.1/tcp/4000", "has no /p2p/<peer id> part"),
        ("/ip4/127.0.0.1/tcp/4000/p2p/abc", "is not a valid multiaddr"),
    ],
)
def test_a_malformed_join_address_is_one_line_with_the_expected_form(address: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_join_address(address)
    text = str(caught.value)
    assert message in text
    assert "expected /ip4/<ip>/tcp/<port>/p2p/<peer id>, as printed by aggregator-server" in text
    assert "\n" not in text


def test_a_good_join_address_gives_its_peer_id() -> None:
    maddr, peer_id = parse_join_address(f"/ip4/10.0.0.1/tcp/4000/p2p/{PEER_ID}")
    assert (str(maddr), peer_id.to_base58()) == (f"/ip4/10.0.0.1/tcp/4000/p2p/{PEER_ID}", PEER_ID)


def test_malformed_join_is_a_problem_line_and_exit_1_without_dialing(
    fake_p2pd: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    started = time.monotonic()
    code = run_doctor(join=["/ip4/1.2.3/tcp/x"], as_json=False, timeout_s=5)
    elapsed_s = time.monotonic() - started
    # Assert
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert elapsed_s < 5
    assert len(fake_p2pd) == 1  # the p2pd check only: a malformed address is never dialed
    join_lines = [line for line in lines if "join /ip4/1.2.3/tcp/x" in line]
    assert len(join_lines) == 1 and join_lines[0].startswith("problem")
    assert "is not a valid multiaddr" in join_lines[0] and "fix:" in join_lines[0]
    assert [line.split(":")[0].split() for line in lines[:4]] == [
        ["ok", "versions"],
        ["ok", "p2pd"],
        ["problem", "join", "/ip4/1.2.3/tcp/x"],
        ["warning", "reachability"],
    ]
    assert lines[-1].startswith("1 problem(s)")


def test_json_report_shape(fake_p2pd: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = run_doctor(join=[], as_json=True, timeout_s=5)
    # Assert
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object, nothing else on stdout
    assert set(report) == {"checks", "ok"}
    assert [check["name"] for check in report["checks"]] == ["versions", "p2pd", "reachability", "device", "disk"]
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["status"] in {"ok", "warning", "problem"}
    reachability = report["checks"][2]
    assert reachability["status"] == "warning" and "--client-mode" in reachability["fix"]
    assert report["ok"] is (code == 0)
    assert report["ok"] is all(check["status"] != "problem" for check in report["checks"])


def test_a_public_address_makes_reachability_ok() -> None:
    public = preflight._reachability([Multiaddr(f"/ip4/8.8.8.8/tcp/4000/p2p/{PEER_ID}")])
    private = preflight._reachability([Multiaddr("/ip4/10.1.2.3/tcp/4000"), Multiaddr("/ip4/127.0.0.1/tcp/4000")])
    assert (public.status, private.status) == (Status.OK, Status.WARNING)
    assert "8.8.8.8" in public.detail


def test_private_addresses_and_a_public_aggregator_read_as_behind_nat_with_what_that_means() -> None:
    # Prepare: what p2pd shows at home, and the aggregator reached
    seen = [Multiaddr("/ip4/192.168.1.20/tcp/4000"), Multiaddr("/ip4/127.0.0.1/tcp/4000")]
    aggregator = Multiaddr(f"/ip4/1.1.1.1/tcp/31337/p2p/{PEER_ID}")
    # Execute
    home = preflight._reachability(seen, joined=[aggregator])
    lan = preflight._reachability(seen, joined=[Multiaddr(f"/ip4/192.168.1.2/tcp/31337/p2p/{PEER_ID}")])
    # Assert: a guess ("appear"), and what the volunteer can and cannot do
    assert home.status is Status.WARNING
    assert "appear to be behind NAT" in home.detail
    assert "--client-mode" in home.fix and "earn credit" in home.fix and "cannot serve the state" in home.fix
    assert lan.status is Status.OK and "share a private network" in lan.detail


@pytest.mark.parametrize(
    ("free_bytes", "status"),
    [(100 * 10**6, Status.PROBLEM), (10**9, Status.WARNING), (50 * 10**9, Status.OK)],
)
def test_disk_check_thresholds(
    free_bytes: int, status: Status, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    asked: list[Path] = []

    def disk_usage(path: Path) -> Any:
        asked.append(Path(path))
        return SimpleNamespace(total=10**12, used=10**12 - free_bytes, free=free_bytes)

    monkeypatch.setattr(preflight.shutil, "disk_usage", disk_usage)
    # Execute
    check = check_disk(path=tmp_path / "not" / "yet" / ".potluck")
    # Assert
    assert asked == [tmp_path]  # the nearest existing parent of a home that does not exist yet
    assert (check.name, check.status) == ("disk", status)
    assert str(tmp_path) in check.detail
    assert bool(check.fix) is (status is not Status.OK)


def test_device_check_names_a_gpu_or_the_cpu_cores() -> None:
    check = check_device()
    assert check.name == "device"
    if check.status is Status.OK:
        assert "GiB free" in check.detail or check.detail.startswith("CPU only (")
    else:
        assert check.fix


class _ConnectedP2P:
    """Stands in for a started P2P connected to an aggregator (and to one other node)."""

    def __init__(self, peers: list[PeerInfo] | None) -> None:
        self.peers = peers

    async def list_peers(self) -> list[PeerInfo]:
        if self.peers is None:
            raise OSError("p2pd went away")
        return self.peers


def test_the_aggregator_is_compared_at_the_address_p2pd_connected_to_not_its_name() -> None:
    # Prepare: joined by name; p2pd resolved it to a public address
    aggregator = PeerID.from_base58(PEER_ID)
    other = PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    by_name = Multiaddr(f"/dns4/aggregator.example/tcp/31337/p2p/{PEER_ID}")
    connected = _ConnectedP2P(
        [
            PeerInfo(other, [Multiaddr("/ip4/192.168.1.9/tcp/1")]),
            PeerInfo(aggregator, [Multiaddr("/ip4/1.1.1.1/tcp/31337")]),
        ]
    )
    # Execute
    found = asyncio.run(preflight._connected_to(connected, aggregator, fallback=by_name, timeout_s=5))  # type: ignore[arg-type]
    unlisted = asyncio.run(preflight._connected_to(_ConnectedP2P(None), aggregator, fallback=by_name, timeout_s=5))  # type: ignore[arg-type]
    # Assert: the resolved public address makes a home machine read as behind NAT; without it, the name is kept
    assert [str(a) for a in found] == ["/ip4/1.1.1.1/tcp/31337"]
    assert unlisted == [by_name]
    assert (
        "appear to be behind NAT"
        in preflight._reachability([Multiaddr("/ip4/192.168.1.20/tcp/4000")], joined=found).detail
    )
