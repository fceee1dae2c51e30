"""The network lab for real: namespaces joined by a bridge, each direction shaped, and nothing left after.

Skipped, with the reason, where the lab cannot run (not root, no iproute2).
"""

import os
import subprocess
import sys

import pytest

from potluck.lab.netlab import Link, NatUnavailable, NetLab, clean_stale, lab_namespaces, unavailable_reason

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]

RUN: dict[str, object] = {"capture_output": True, "text": True, "timeout": 20, "check": True}
PAYLOAD_BYTES = 1_500_000
SERVER = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 5555))
print("listening", flush=True)
conn, _ = s.accept()
if sys.argv[2] == "receive":
    got = 0
    while got < {n}:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        got += len(chunk)
    conn.sendall(b"k")
else:
    conn.sendall(b"x" * {n})
conn.close()
""".replace("{n}", str(PAYLOAD_BYTES))
CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5555), timeout=30)
started = time.monotonic()
if sys.argv[2] == "receive":  # the server receives: this side uploads
    c.sendall(b"x" * {n})
    c.recv(1)
else:
    got = 0
    while got < {n}:
        chunk = c.recv(1 << 16)
        if not chunk:
            break
        got += len(chunk)
print(time.monotonic() - started)
""".replace("{n}", str(PAYLOAD_BYTES))


def _transfer_s(lab: NetLab, direction: str) -> float:
    server = subprocess.Popen(
        lab.command(0, [sys.executable, "-c", SERVER, lab.addresses[0], direction]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        client = subprocess.run(
            lab.command(1, [sys.executable, "-c", CLIENT, lab.addresses[0], direction]),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return float(client.stdout)
    finally:
        server.kill()
        server.wait(timeout=10)
        assert server.stdout is not None
        server.stdout.close()


@pytest.mark.timeout(120)
def test_each_direction_is_shaped_to_its_rate_and_the_lab_leaves_nothing_behind() -> None:
    # Prepare: a server behind a fast link, a client that uploads at 8 Mbit/s and downloads at 80
    fast = Link(up_bits_per_s=10**9, down_bits_per_s=10**9)
    volunteer = Link(up_bits_per_s=8 * 10**6, down_bits_per_s=80 * 10**6)
    with NetLab([fast, volunteer]) as lab:
        names = list(lab.namespaces) + [lab.hub]
        assert set(names) <= set(lab_namespaces())
        # Execute
        upload_s = _transfer_s(lab, "receive")
        download_s = _transfer_s(lab, "send")
    # Assert: 1.5 MB at 8 Mbit/s takes 1.5 s; at 80 Mbit/s a tenth of that
    assert 1.2 < upload_s < 4.0
    assert download_s < upload_s / 4
    assert not set(names) & set(lab_namespaces())


def test_a_lab_whose_owner_died_is_removed_by_the_next_one() -> None:
    # Prepare: a namespace named for a process that no longer exists
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not os.path.exists(f"/proc/{dead.pid}")  # reaped: its pid names no process now
    name = f"pl{dead.pid}x0-hub"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # Execute
        removed = clean_stale()
        # Assert
        assert name in removed
        assert name not in lab_namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


ACCEPT_ONCE = """
import socket, sys
s = socket.create_server(("0.0.0.0", 5556))
s.settimeout(20)
print("listening", flush=True)
conn, (host, _) = s.accept()
print(host, flush=True)
"""
DIAL = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 5556), timeout=3).close()
except OSError as e:
    print(type(e).__name__)
else:
    print("connected")
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(unavailable_reason(nat=True) is not None, reason=str(unavailable_reason(nat=True)))
def test_a_natted_node_dials_out_under_the_routers_address_and_nobody_dials_in() -> None:
    # Prepare: one public node, one behind the lab's NAT router
    fast = Link(up_bits_per_s=10**9, down_bits_per_s=10**9)
    try:
        lab = NetLab([fast], natted=[fast])
    except NatUnavailable as e:
        pytest.skip(str(e))
    with lab:
        names = [*lab.namespaces, lab.hub, str(lab.router)]
        public = subprocess.Popen(
            lab.command(0, [sys.executable, "-c", ACCEPT_ONCE]), stdout=subprocess.PIPE, text=True
        )
        natted = subprocess.Popen(
            lab.command(1, [sys.executable, "-c", ACCEPT_ONCE]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert public.stdout is not None and natted.stdout is not None
            assert public.stdout.readline().strip() == natted.stdout.readline().strip() == "listening"
            # Execute: the natted node dials the public one; the public one dials the natted one's
            # home address, the router's address, and the home address again through a route it adds
            out = subprocess.run(lab.command(1, [sys.executable, "-c", DIAL, lab.addresses[0]]), **RUN)
            seen_as = public.stdout.readline().strip()
            inward = [subprocess.run(lab.command(0, [sys.executable, "-c", DIAL, a]), **RUN).stdout.strip()
                      for a in (lab.addresses[1], lab.router_address)]  # fmt: skip
            route = ["ip", "route", "add", f"{lab.home_prefix}.0/24", "via", lab.router_address]
            subprocess.run(lab.command(0, route), check=True, timeout=20)
            routed = subprocess.run(lab.command(0, [sys.executable, "-c", DIAL, lab.addresses[1]]), **RUN)
        finally:
            for server in (public, natted):
                server.kill()
                server.wait(timeout=10)
                assert server.stdout is not None
                server.stdout.close()
    # Assert: out it goes as the router; in, nothing gets through
    assert lab.behind_nat(1) and not lab.behind_nat(0)
    assert out.stdout.strip() == "connected"
    assert seen_as == lab.router_address
    assert inward == ["OSError", "ConnectionRefusedError"]  # no route to a home network; nothing listens there
    assert routed.stdout.strip() == "TimeoutError"  # the router forwards nothing inward
    assert not set(names) & set(lab_namespaces())
