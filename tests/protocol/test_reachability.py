"""Who can dial a node, judged from its own addresses and the aggregator's: the guess `potluck doctor` prints and a
serving peer acts on (it announces no holder record when it appears to be behind NAT)."""

import pytest

from potluck.protocol.reachability import Reachability, classify, ips_of

PEER_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize(
    ("own", "remote", "expected"),
    [
        # a home volunteer: private addresses (home LAN, a carrier's NAT range), a public aggregator
        (["192.168.1.20", "127.0.0.1"], ["1.1.1.1"], Reachability.BEHIND_NAT),
        (["100.64.3.9"], ["8.8.8.8"], Reachability.BEHIND_NAT),
        # with nothing to compare with, private addresses alone still read as NAT
        (["10.0.0.5"], [], Reachability.BEHIND_NAT),
        # a public address (or a router's port mapping that p2pd found) is dialable
        (["192.168.1.20", "8.8.4.4"], ["8.8.8.8"], Reachability.PUBLIC),
        (["2001:4860:4860::8888"], [], Reachability.PUBLIC),
        # a LAN: the aggregator is private too, in the same private block
        (["192.168.7.2"], ["192.168.7.1"], Reachability.SAME_NETWORK),
        (["10.1.2.3", "127.0.0.1"], ["10.20.30.1", "127.0.0.1"], Reachability.SAME_NETWORK),
        # another private block: a router stands between them (the network lab's home network)
        (["192.168.7.2"], ["10.20.30.1"], Reachability.BEHIND_NAT),
        # one machine
        (["127.0.0.1"], ["127.0.0.1"], Reachability.SAME_NETWORK),
        # nothing but loopback and link-local here, and a public aggregator
        (["127.0.0.1", "fe80::1"], ["8.8.8.8"], Reachability.UNKNOWN),
    ],
)
def test_addresses_classify_as_a_person_would_read_them(
    own: list[str], remote: list[str], expected: Reachability
) -> None:
    assert classify(own, remote_ips=remote).reachability is expected


def test_behind_nat_says_appears_and_what_it_means_for_a_volunteer() -> None:
    verdict = classify(["192.168.1.20"], remote_ips=["1.1.1.1"])

    assert not verdict.can_serve_state
    assert "appear to be behind NAT" in verdict.detail and "192.168.1.20" in verdict.detail
    assert "--client-mode" in verdict.meaning and "earn credit" in verdict.meaning
    assert "cannot serve the state" in verdict.meaning


def test_another_private_network_is_named_as_such() -> None:
    verdict = classify(["192.168.7.2"], remote_ips=["10.20.30.1"])

    assert "the aggregator is on another private network" in verdict.detail


def test_public_and_same_network_nodes_can_serve_state() -> None:
    assert classify(["8.8.4.4"], remote_ips=["8.8.8.8"]).can_serve_state
    assert classify(["192.168.7.2"], remote_ips=["192.168.7.1"]).can_serve_state


def test_ips_come_out_of_multiaddrs_once_each_and_names_and_junk_are_skipped() -> None:
    maddrs = [
        f"/ip4/192.168.1.20/tcp/4000/p2p/{PEER_ID}",
        "/ip4/192.168.1.20/udp/4000/quic",
        "/ip6/::1/tcp/4000",
        "/dns4/aggregator.example/tcp/4000",
    ]

    assert ips_of(maddrs) == ["192.168.1.20", "::1"]
    assert classify(["not an address"], remote_ips=["nor this"]).reachability is Reachability.UNKNOWN
