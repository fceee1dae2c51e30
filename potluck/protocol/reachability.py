"""Whether other nodes can dial this one, as far as its own addresses and the aggregator's can tell.

A volunteer at home sits behind a NAT router: its interfaces carry private addresses (192.168.x.x,
10.x.x.x, 100.64.x.x of a carrier's NAT), the aggregator it joins is on a public one (or on another
private network), and nothing on the other side can open a connection to it. Such a volunteer trains
and earns credit in `--client-mode` (it only dials out), but cannot serve the state to joiners: a
holder record naming its addresses would send them dialling in vain. This module only reads addresses,
so its verdict is a guess and says so ("appears"): a firewall can block a public address, and a port
forward or a VPN can open a private one. `potluck doctor` prints the verdict; a serving peer that
appears to be behind NAT announces no holder record.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = ["Reachability", "Verdict", "classify", "ips_of"]

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
# The private blocks a router hands out: two nodes in different ones are on different networks, a router between
# them, and unless it forwards a port for them the one inside cannot be dialled from the other side.
_PRIVATE_BLOCKS = tuple(
    ipaddress.ip_network(block)
    for block in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


class Reachability(str, Enum):
    """What a node's addresses say about who can dial it."""

    PUBLIC = "public"  # it has a globally routable address: dialable unless a firewall blocks its port
    SAME_NETWORK = "same-network"  # private addresses, and so is every aggregator it joins: a LAN, a lab, one machine
    # only private addresses, while what it joins is public, on another private block, or unknown
    BEHIND_NAT = "behind-nat"
    UNKNOWN = "unknown"  # no address to judge by


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """A classification with its one-line reason and what it means for a volunteer."""

    reachability: Reachability
    detail: str
    meaning: str

    @property
    def can_serve_state(self) -> bool:
        """Whether joiners could dial this node for state chunks (a guess, like the verdict itself)."""
        return self.reachability in (Reachability.PUBLIC, Reachability.SAME_NETWORK)


def ips_of(maddrs: Iterable[object]) -> list[str]:
    """The IP addresses in some multiaddrs (as objects or text), in order, each once; DNS names are skipped."""
    found: list[str] = []
    for maddr in maddrs:
        parts = str(maddr).split("/")
        for proto, value in zip(parts, parts[1:], strict=False):
            if proto in ("ip4", "ip6") and value not in found:
                found.append(value)
    return found


def _parsed(ips: Iterable[str]) -> list[_IP]:
    parsed = []
    for ip in ips:
        try:
            parsed.append(ipaddress.ip_address(ip))
        except ValueError:
            continue  # not an address: nothing to judge by
    return parsed


def _blocks(ips: Iterable[_IP]) -> set[int]:
    """Which of the private blocks these addresses fall in (by index)."""
    return {i for i, block in enumerate(_PRIVATE_BLOCKS) for ip in ips if ip in block}


def classify(own_ips: Iterable[str], *, remote_ips: Iterable[str] = ()) -> Verdict:
    """Who can dial a node with addresses `own_ips` that joins nodes at `remote_ips` (empty: not known).

    Loopback and link-local addresses of its own say nothing about the outside, so they are left out
    unless every remote address is loopback too (a run on one machine).
    """
    own = _parsed(own_ips)
    remote = _parsed(remote_ips)
    if remote and all(ip.is_loopback for ip in remote):
        return Verdict(
            reachability=Reachability.SAME_NETWORK,
            detail="the aggregator is on this machine (loopback)",
            meaning="nodes on this machine can dial you; nothing else is involved",
        )
    outward = [ip for ip in own if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)]
    public = [ip for ip in outward if ip.is_global]
    if public:
        return Verdict(
            reachability=Reachability.PUBLIC,
            detail=f"public address {', '.join(map(str, public))}",
            meaning="others can dial you unless a firewall blocks potluck's port; you can serve state to joiners",
        )
    if not outward:
        return Verdict(
            reachability=Reachability.UNKNOWN,
            detail="no address other than loopback or link-local",
            meaning="connect to a network first",
        )
    private = ", ".join(map(str, outward))
    if remote and not any(ip.is_global for ip in remote) and _blocks(outward) & _blocks(remote):
        return Verdict(
            reachability=Reachability.SAME_NETWORK,
            detail=f"private address {private}, like the aggregator's: you appear to share a private network",
            meaning="nodes on that network can dial you; nobody outside it can",
        )
    if not remote:
        joined = "no aggregator address to compare with"
    elif any(ip.is_global for ip in remote):
        joined = "the aggregator is public"
    else:
        joined = "the aggregator is on another private network"
    return Verdict(
        reachability=Reachability.BEHIND_NAT,
        detail=f"only private addresses ({private}) and {joined}: you appear to be behind NAT or a firewall",
        meaning=(
            "run peer with --client-mode: you dial out, train and earn credit as usual, "
            "but nobody can dial you, so you cannot serve the state to joiners"
        ),
    )
