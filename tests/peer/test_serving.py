"""A serving peer announces a holder record only where joiners could dial it: never in client mode, and not
when its addresses are all private while the aggregator it joined is public (it appears to be behind NAT)."""

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from potluck.peer.options import PeerOptions
from potluck.peer.records import Tally
from potluck.peer.serving import StateServer
from potluck.protocol.identity import generate_identity

PEER_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


class _FakeNode:
    """What StateServer asks of a node: its visible addresses, its peer id, and a DHT that records stores."""

    def __init__(self, visible: list[str]) -> None:
        self.stored: list[Any] = []
        self.p2p = SimpleNamespace(
            get_visible_maddrs=self._visible, peer_id=SimpleNamespace(to_bytes=lambda: b"id"), list_peers=self._peers
        )
        self.dht = SimpleNamespace(store=self._store)
        self.visible = visible

    async def _visible(self, latest: bool = False) -> list[str]:
        return [f"{m}/p2p/{PEER_ID}" for m in self.visible]

    async def _peers(self) -> list[Any]:
        return []

    async def _store(self, *args: Any, **kwargs: Any) -> bool:
        self.stored.append((args, kwargs))
        return True


def _master() -> Any:
    cfg = SimpleNamespace(config_hash="c" * 64, round_deadline_s=30.0)
    return SimpleNamespace(cfg=cfg, shards=[SimpleNamespace(index=0, version=1, contributors=0)], params={})


def _announced(visible: list[str], join: str, *, client_mode: bool = False) -> tuple[bool, StateServer]:
    node = _FakeNode(visible)
    options = PeerOptions(join=(f"{join}/tcp/31337/p2p/{PEER_ID}",), client_mode=client_mode)
    server = StateServer(node, generate_identity(), options, tally=Tally())  # type: ignore[arg-type]
    asyncio.run(server.announce_holding(_master()))
    return bool(node.stored), server


@pytest.mark.parametrize(
    ("visible", "join", "announced"),
    [
        (["/ip4/127.0.0.1/tcp/4000"], "/ip4/127.0.0.1", True),  # one machine
        (["/ip4/192.168.7.2/tcp/4000"], "/ip4/192.168.7.1", True),  # a LAN: one private network
        (["/ip4/192.168.7.2/tcp/4000"], "/ip4/10.20.30.1", False),  # a home network behind a router
        (["/ip4/192.168.1.20/tcp/4000", "/ip4/8.8.4.4/tcp/4000"], "/ip4/8.8.8.8", True),  # a public address
        (["/ip4/192.168.1.20/tcp/4000", "/ip4/127.0.0.1/tcp/4000"], "/ip4/8.8.8.8", False),  # home, behind NAT
        (["/ip4/192.168.1.20/tcp/4000"], "/dns4/aggregator", True),  # a name: nothing to compare with
    ],
)
def test_a_holder_record_is_announced_only_where_joiners_could_dial_it(
    visible: list[str], join: str, announced: bool
) -> None:
    # Execute
    stored, server = _announced(visible, join)
    # Assert
    assert stored is announced
    assert server.serves is announced


def test_a_peer_in_client_mode_never_announces() -> None:
    stored, server = _announced(["/ip4/8.8.4.4/tcp/4000"], "/ip4/8.8.8.8", client_mode=True)

    assert not stored and not server.serves


def test_an_aggregator_joined_by_name_is_compared_at_the_addresses_p2pd_is_connected_to() -> None:
    # Prepare: at home, joined by name; p2pd is connected to the aggregator's public address
    node = _FakeNode(["/ip4/192.168.1.20/tcp/4000"])
    connected = [SimpleNamespace(addrs=["/ip4/8.8.8.8/tcp/31337"])]

    async def list_peers() -> list[Any]:
        return connected

    node.p2p.list_peers = list_peers
    options = PeerOptions(join=(f"/dns4/aggregator.example/tcp/31337/p2p/{PEER_ID}",))
    server = StateServer(node, generate_identity(), options, tally=Tally())  # type: ignore[arg-type]
    # Execute
    asyncio.run(server.announce_holding(_master()))
    # Assert
    assert node.stored == [] and not server.serves
