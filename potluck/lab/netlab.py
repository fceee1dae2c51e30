"""A network lab on one Linux machine: each node in its own network namespace behind a shaped link.

Volunteers' links upload about ten times slower than they download; loopback has neither limit. The
lab gives every node a namespace of its own with one interface, joined to the others by a bridge in
a hub namespace, and shapes each direction with a `tc` token bucket (tbf):

    node namespace: eth0 (10.X.Y.i/24), egress shaped to the node's upload rate
    hub namespace:  bridge br0 + the veth's other end, egress shaped to the node's download rate

Volunteers at home also sit behind NAT. Nodes given as `natted` sit on a home network of their own
(192.168.X.0/24) behind a router namespace that masquerades them (nftables) onto the hub's network:
they can dial out to every public node, and nobody can dial them, exactly as a home router does it:

    router namespace: eth0 (10.X.Y.254/24) on the hub's bridge, bridge lan0 (192.168.X.1/24),
                      masquerade out of eth0, forward only lan0 -> eth0 and the replies
    natted node:      eth0 (192.168.X.i/24), default route via 192.168.X.1, shaped as above

The root namespace is never touched: no address, route or qdisc of the host changes, and the lab's
private range cannot clash with the host's because nothing outside the lab can see it. Namespaces are
named after the process that made them (`pl<pid>x<n>-...`), so `clean_stale()` can remove a lab whose
owner was killed before it could clean up; `close()` (or leaving the `with` block) removes the lab's
own on every other exit path. Needs root and iproute2 (`ip`, `tc`), and nftables (`nft`) for natted
nodes; `unavailable_reason()` says which is missing, for tests to skip with.
"""

import itertools
import logging
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from potluck.errors import PotluckError

logger = logging.getLogger(__name__)

_PREFIX = "pl"  # every lab namespace's name starts with pl<owner pid>x
_COUNTER = itertools.count()
_RATE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<prefix>[kmg]?)(?:bit|bps|bit/s)?", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
COMMAND_TIMEOUT_S = 20.0


class NetLabError(PotluckError):
    """The lab cannot be built or used (one line, with what to do)."""


class NatUnavailable(NetLabError):
    """`nft` is installed but this kernel (or sandbox) will not masquerade: natted nodes cannot be built here."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One node's access link, in bits per second each way."""

    up_bits_per_s: int
    down_bits_per_s: int

    def __str__(self) -> str:
        return f"{_human(self.up_bits_per_s)}/{_human(self.down_bits_per_s)}"


def _human(bits_per_s: int) -> str:
    for scale, unit in ((10**9, "gbit"), (10**6, "mbit"), (10**3, "kbit")):
        if bits_per_s >= scale and bits_per_s % scale == 0:
            return f"{bits_per_s // scale}{unit}"
    return f"{bits_per_s}bit"


def parse_rate(text: str) -> int:
    """'10mbit', '100Mbit', '1gbit', '500kbit' or a plain number of bits per second, as an int; ValueError."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot read {text!r} as a link rate; write e.g. 10mbit, 500kbit or 1gbit")
    value = int(float(match["number"]) * _SCALE[match["prefix"].lower()])
    if not 8_000 <= value <= 100 * 10**9:
        raise ValueError(f"link rate {text!r} is outside 8kbit..100gbit")
    return value


def parse_link(text: str) -> Link:
    """`UP/DOWN`, e.g. '10mbit/100mbit' (a volunteer's link: slow up, fast down); ValueError with the form."""
    parts = text.split("/")
    if len(parts) != 2:
        raise ValueError(f"--link {text!r}: write UP/DOWN, e.g. 10mbit/100mbit")
    return Link(up_bits_per_s=parse_rate(parts[0]), down_bits_per_s=parse_rate(parts[1]))


def unavailable_reason(*, nat: bool = False) -> str | None:
    """Why a lab (with natted nodes when `nat`) cannot be built here (not root, no iproute2 or nftables), or None."""
    if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
        return "the network lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network lab needs root (it creates network namespaces and veth links)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the network lab needs iproute2 ({' and '.join(missing)} not found); apt-get install iproute2"
    if nat and shutil.which("nft") is None:
        return "the network lab's NAT router needs nftables (nft not found); apt-get install nftables"
    return None


def _run(*args: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(  # noqa: S603
            args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetLabError(f"{' '.join(args)}: {e}") from e
    if done.returncode != 0:
        raise NetLabError(f"{' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout


def _tbf(rate_bits_per_s: int) -> list[str]:
    """A token bucket at `rate`: the bucket holds 10 ms of traffic (at least 16 kB, as one timer tick needs)."""
    burst_bytes = max(16_000, rate_bits_per_s // 8 // 100)
    return ["tbf", "rate", f"{rate_bits_per_s}bit", "burst", str(burst_bytes), "latency", "100ms"]


# The router's whole firewall: what leaves by eth0 from the home network takes the router's address, and
# only the replies to what a home node opened come back in; nothing from outside is forwarded to lan0.
_NAT_RULES = """
table ip potluck_nat {
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; oifname "eth0" masquerade; }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "eth0" accept
    }
}
"""


def _bridge(namespace: str, name: str) -> None:
    _run("ip", "-n", namespace, "link", "add", name, "type", "bridge")
    _run("ip", "-n", namespace, "link", "set", name, "up")


def _veth(switch: str, end: str, bridge: str, namespace: str, address: str) -> None:
    """A link from `bridge` in namespace `switch` (its end named `end`) to eth0 in `namespace`, at `address`/24."""
    _run("ip", "-n", switch, "link", "add", end, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    _run("ip", "-n", switch, "link", "set", end, "master", bridge, "up")
    _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
    _run("ip", "-n", namespace, "link", "set", "eth0", "up")
    _run("ip", "-n", namespace, "link", "set", "lo", "up")


def lab_namespaces() -> list[str]:
    """Every namespace a lab made on this machine (of any owner)."""
    out = _run("ip", "netns", "list")
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if re.fullmatch(rf"{_PREFIX}\d+x\d+-.+", n)]


def clean_stale() -> list[str]:
    """Remove the namespaces of labs whose owner process is gone (killed before its cleanup); their names."""
    removed = []
    for name in lab_namespaces():
        owner = int(name[len(_PREFIX) :].split("x", 1)[0])
        if owner != os.getpid() and not os.path.exists(f"/proc/{owner}"):
            _delete_namespace(name)
            removed.append(name)
    return removed


def _delete_namespace(name: str) -> None:
    """Kill what still runs in namespace `name`, then delete it (its veth ends go with it)."""
    try:
        pids = _run("ip", "netns", "pids", name).split()
    except NetLabError:
        pids = []
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError, PermissionError):
            pass
    try:
        _run("ip", "netns", "delete", name)
    except NetLabError as e:
        logger.warning("could not remove network namespace %s: %s", name, e)


class NetLab:
    """A hub, `len(links)` public nodes (node i behind `links[i]`), then `len(natted)` nodes behind one NAT router.

    Node `len(links) + j` is natted node j, behind `natted[j]`; its address in `addresses` is its home
    network's, which only it and the router see; every public node sees it as `router_address`. Use as a
    context manager.
    """

    def __init__(self, links: list[Link], *, natted: list[Link] | None = None) -> None:
        natted = list(natted or [])
        reason = unavailable_reason(nat=bool(natted))
        if reason is not None:
            raise NetLabError(reason)
        if not 1 <= len(links) <= 250 or len(natted) > 250:
            raise NetLabError(
                f"a lab holds 1 to 250 public and 0 to 250 natted nodes, not {len(links)}, {len(natted)}"
            )
        self.links = list(links) + natted
        self.public = len(links)
        self.tag = f"{_PREFIX}{os.getpid()}x{next(_COUNTER)}"
        self.hub = f"{self.tag}-hub"
        self.router = f"{self.tag}-nat" if natted else None
        self.namespaces = [f"{self.tag}-n{i}" for i in range(len(links))] + [
            f"{self.tag}-m{j}" for j in range(len(natted))
        ]
        subnet = secrets.randbelow(200) + 20, secrets.randbelow(250) + 1  # 10.20-219.1-250.0/24
        self.router_address = f"10.{subnet[0]}.{subnet[1]}.254"
        self.home_prefix = f"192.168.{subnet[1]}"
        self.addresses = [f"10.{subnet[0]}.{subnet[1]}.{i + 1}" for i in range(len(links))] + [
            f"{self.home_prefix}.{j + 2}" for j in range(len(natted))
        ]
        self._made: list[str] = []
        try:
            clean_stale()
            self._build()
        except BaseException:
            self.close()
            raise

    def behind_nat(self, node: int) -> bool:
        """Whether node `node` sits behind the lab's NAT router (nobody outside its home network can dial it)."""
        return node >= self.public

    def _build(self) -> None:
        _run("ip", "netns", "add", self.hub)
        self._made.append(self.hub)
        _bridge(self.hub, "br0")
        for i, (ns, link, address) in enumerate(zip(self.namespaces, self.links, self.addresses, strict=True)):
            if i == self.public:
                self._build_router()
            # a natted node hangs off the router's home bridge, a public one off the hub's
            switch, bridge, end = (self.router, "lan0", f"m{i}") if self.behind_nat(i) else (self.hub, "br0", f"v{i}")
            assert switch is not None
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            _veth(switch, end, bridge, ns, address)
            if self.behind_nat(i):
                _run("ip", "-n", ns, "route", "add", "default", "via", f"{self.home_prefix}.1")
            _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", *_tbf(link.up_bits_per_s))
            _run("tc", "-n", switch, "qdisc", "add", "dev", end, "root", *_tbf(link.down_bits_per_s))
        logger.info(
            "network lab %s: %d public nodes on %s.0/24, %d behind NAT",
            self.tag,
            self.public,
            self.addresses[0].rsplit(".", 1)[0],
            len(self.links) - self.public,
        )

    def _build_router(self) -> None:
        """The home router: its eth0 on the hub's bridge, a home bridge lan0, masquerading from one to the other."""
        assert self.router is not None
        _run("ip", "netns", "add", self.router)
        self._made.append(self.router)
        _veth(self.hub, "r0", "br0", self.router, self.router_address)
        _bridge(self.router, "lan0")
        _run("ip", "-n", self.router, "addr", "add", f"{self.home_prefix}.1/24", "dev", "lan0")
        _run("ip", "netns", "exec", self.router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        try:
            _run("ip", "netns", "exec", self.router, "nft", "-f", "-", stdin=_NAT_RULES)
        except NetLabError as e:
            raise NatUnavailable(f"this kernel will not masquerade in a namespace ({e})") from e

    def command(self, node: int, argv: list[str]) -> list[str]:
        """`argv` run inside node `node`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[node], *argv]

    def close(self) -> None:
        """Remove every namespace of this lab (killing what still runs in them); safe to call twice."""
        while self._made:
            _delete_namespace(self._made.pop())

    def __enter__(self) -> "NetLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
