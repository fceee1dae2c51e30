"""Tests for potluck.protocol.node: join-address parsing, and the daemon's connection limit (the rest of the network
parts are integration tests)."""

import asyncio
import warnings
from pathlib import Path

import pytest

from potluck.protocol.node import JOIN_FORMAT, JoinError, create_p2p, parse_join_address, peer_id_of

with warnings.catch_warnings():
    # `import hivemind` runs torch.jit.script at import time, which recent torch deprecates (see test_p2p_streams).
    warnings.simplefilter("ignore", DeprecationWarning)
    from hivemind.p2p import PeerID

PEER_ID = "12D3KooWQFg4b9NM1qpzNirUdP9zjSgvbLJNwE9K8bWUuiw3HmGg"
ADDRESS = f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"


def test_a_valid_join_address_parses_and_names_its_peer() -> None:
    # Execute
    maddr = parse_join_address(ADDRESS)
    # Assert
    assert str(maddr) == ADDRESS
    assert maddr.value_for_protocol("ip4") == "127.0.0.1"
    assert maddr.value_for_protocol("tcp") == "31337"
    assert peer_id_of(maddr) == PeerID.from_base58(PEER_ID)
    assert peer_id_of(maddr).to_base58() == PEER_ID


def test_surrounding_whitespace_is_ignored() -> None:
    assert str(parse_join_address(f"  {ADDRESS}\n")) == ADDRESS


@pytest.mark.parametrize(
    "address",
    [
        f"/ip6/::1/tcp/31337/p2p/{PEER_ID}",
        f"/dns4/aggregator.example.org/tcp/31337/p2p/{PEER_ID}",
        f"/ip4/10.0.0.1/udp/31337/quic/p2p/{PEER_ID}",
    ],
)
def test_other_host_and_transport_forms_are_accepted(address: str) -> None:
    assert peer_id_of(parse_join_address(address)).to_base58() == PEER_ID


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("", "is not a valid multiaddr"),
        ("127.0.0.1:31337", "is not a valid multiaddr"),
        ("/ip4/127.0.0.1/tcp/31337/p2p/abc", "is not a valid multiaddr"),
        ("/ip4/999.0.0.1/tcp/31337", "is not a valid multiaddr"),
        ("/ip4/127.0.0.1/tcp/notaport", "is not a valid multiaddr"),
        ("/nonsense/1", "is not a valid multiaddr"),
        ("/ip4/127.0.0.1/tcp/31337", "has no /p2p/<peer id> part"),
        ("/ip4/127.0.0.1", "has no /p2p/<peer id> part"),
        (f"/p2p/{PEER_ID}", "names no host and port"),
        (f"/ip4/127.0.0.1/p2p/{PEER_ID}", "names no host and port"),
        (f"/tcp/31337/p2p/{PEER_ID}", "names no host and port"),
    ],
)
def test_bad_join_addresses_are_refused_with_the_expected_form(address: str, expected: str) -> None:
    # Execute
    with pytest.raises(JoinError, match=expected) as error:
        parse_join_address(address)
    # Assert: one line that shows the user what to type
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith(f"expected {JOIN_FORMAT}")
    assert "/ip4/<ip>/tcp/<port>/p2p/<peer id>" in message


def _daemon_args(max_connections: int | None) -> list[str]:
    """The command line of the p2pd that create_p2p starts (read from /proc), after it is stopped again."""

    async def start_and_read() -> list[str]:
        p2p = await create_p2p(max_connections=max_connections)
        try:
            pid = p2p._child.pid  # hivemind's handle on its p2pd process
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        finally:
            await p2p.shutdown()

    return asyncio.run(start_and_read())


@pytest.mark.network
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads the daemon's command line from /proc")
def test_a_node_keeps_the_connections_it_is_told_to() -> None:
    # Execute
    raised, default = _daemon_args(6_000), _daemon_args(None)
    # Assert: an aggregator's daemon trims above 6,000 (down to 4,500); a peer's keeps p2pd's own 512 / 256
    assert "-connHi=6000" in raised and "-connLo=4500" in raised and "-connManager=1" in raised
    assert not any(arg.startswith(("-connHi", "-connLo")) for arg in default)
