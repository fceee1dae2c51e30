"""`potluck doctor`: the volunteer's pre-flight check, one line per check, each with what to do about it.

Before a volunteer lends a GPU for hours, they should learn in seconds whether it will work: the versions
match, the bundled p2pd daemon starts, the aggregator addresses they were given parse and answer, their
link's upload and download rates to that aggregator, whether others can dial them, what they will train
on, and whether ~/.potluck has room for checkpoints. Each check is ok, a warning (works, but know this)
or a problem (will not work until fixed); the exit status is 1 when any check is a problem.

Every network step is bounded by `timeout_s`, and every p2pd started here is shut down on every path,
including Ctrl-C in the middle of its start. The link's rates come from the aggregator's probe handler,
measured with `potluck.protocol.probe.measure_rates`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potluck import __version__
from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.probe import ProbeUnavailableError, daemon_reason, measure_rates
from potluck.protocol.reachability import classify, ips_of
from potluck.protocol.wire import PeerRefusedError, WireError

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

__all__ = [
    "Check",
    "ProbeUnavailableError",
    "Status",
    "check_device",
    "check_disk",
    "check_versions",
    "measure_link",
    "measure_rates",
    "parse_join_address",
    "run_doctor",
]

logger = logging.getLogger(__name__)

POTLUCK_HOME = Path("~/.potluck")
LOW_DISK_WARNING_BYTES = 2 * 10**9  # a few checkpoints of a ~100M-parameter model with optimizer state
LOW_DISK_PROBLEM_BYTES = 200 * 10**6  # not even one such checkpoint fits
# 2 MiB each way: takes about 16 s at 1 Mbit/s, inside the default 30 s step timeout, and is still long
# enough on a fast link for the one-RTT correction to matter less than the transfer itself.
DOCTOR_PROBE_BYTES = 2 * 1024 * 1024
_LISTEN_ALL = ["/ip4/0.0.0.0/tcp/0"]  # every interface, so the visible addresses show a public IP if there is one


class Status(str, Enum):
    """How a check came out. A problem makes `potluck doctor` exit 1; a warning does not."""

    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    """One line of the report."""

    name: str  # short and stable, e.g. "p2pd" or "join /ip4/.../p2p/Qm..."; JSON consumers key on it
    status: Status
    detail: str  # what was found, one line
    fix: str = ""  # what to do about it, one line; empty when there is nothing to do


# --- checks that need no network ---------------------------------------------------------------


def _version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def check_versions() -> Check:
    """potluck, wire protocol, hivemind, torch and Python versions: what a bug report needs first."""
    detail = (
        f"potluck {__version__}, protocol v{PROTOCOL_VERSION}, hivemind {_version_of('hivemind')}, "
        f"torch {_version_of('torch')}, python {platform.python_version()}"
    )
    return Check(name="versions", status=Status.OK, detail=detail)


def check_device() -> Check:
    """What training would run on: the first CUDA GPU with its free memory, or the CPU with its core count."""
    import torch

    if not torch.cuda.is_available():
        return Check(
            name="device",
            status=Status.OK,
            detail=f"CPU only ({os.cpu_count() or 1} cores); training works but will be slow",
        )
    try:
        free_bytes, total_bytes = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
    except RuntimeError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Check(
            name="device",
            status=Status.PROBLEM,
            detail=f"CUDA is present but the GPU cannot be queried: {first_line}",
            fix="check nvidia-smi; another process may hold the GPU, or the driver needs a restart",
        )
    more = torch.cuda.device_count() - 1
    detail = f"{name}, {free_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB free" + (
        f" (+{more} more GPU{'s' if more > 1 else ''})" if more else ""
    )
    return Check(name="device", status=Status.OK, detail=detail)


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing parent (~/.potluck before its first use)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_disk(*, path: Path = POTLUCK_HOME) -> Check:
    """Free space where potluck keeps checkpoints: a warning under 2 GB, a problem under 200 MB."""
    path = path.expanduser()
    where = _nearest_existing(path)
    free_bytes = shutil.disk_usage(where).free
    detail = f"{free_bytes / 1e9:.1f} GB free in {where}"
    if free_bytes < LOW_DISK_PROBLEM_BYTES:
        fix = f"free at least {LOW_DISK_WARNING_BYTES // 10**9} GB on that disk, or point HOME at a larger one"
        return Check(name="disk", status=Status.PROBLEM, detail=detail, fix=fix)
    if free_bytes < LOW_DISK_WARNING_BYTES:
        fix = f"checkpoints need a few GB; free up to {LOW_DISK_WARNING_BYTES // 10**9} GB to be safe"
        return Check(name="disk", status=Status.WARNING, detail=detail, fix=fix)
    return Check(name="disk", status=Status.OK, detail=detail)


def parse_join_address(address: str) -> tuple[Multiaddr, PeerID]:
    """An aggregator address and its peer id; raises ValueError (one line, with the expected form) otherwise."""
    from potluck.protocol.node import JoinError, peer_id_of
    from potluck.protocol.node import parse_join_address as parse

    try:
        maddr = parse(address)
        return maddr, peer_id_of(maddr)
    except (JoinError, ValueError) as e:
        raise ValueError(str(e)) from None


def _reachability(maddrs: Iterable[Multiaddr], *, joined: Iterable[Multiaddr] = ()) -> Check:
    """Whether others can dial us, judged from our visible addresses and the aggregators' (a guess: "appears")."""
    verdict = classify(ips_of(maddrs), remote_ips=ips_of(joined))
    detail = f"{verdict.detail} ({verdict.meaning})" if verdict.can_serve_state else verdict.detail
    if verdict.can_serve_state:
        return Check(name="reachability", status=Status.OK, detail=detail)
    return Check(name="reachability", status=Status.WARNING, detail=detail, fix=verdict.meaning)


# --- network --------------------------------------------------------------------------------------


@asynccontextmanager
async def _running_p2p(*, timeout_s: float, **p2p_kwargs: Any) -> AsyncIterator[P2P]:
    """A hivemind P2P (one p2pd child process) shut down on every way out, a failed start included."""
    from potluck.protocol.node import create_p2p

    p2p = await create_p2p(startup_timeout=timeout_s, **p2p_kwargs)
    try:
        yield p2p
    finally:
        await p2p.shutdown()


async def _measure_rates_twice(p2p: P2P, peer_id: PeerID, *, timeout_s: float) -> tuple[float, float]:
    """`measure_rates` with the doctor's probe size, tried again once after a dropped stream or a short reply.

    One stream that fails to open or ends early says little about a link; two in a row do. A refusal
    (PeerRefusedError), a missing handler or a timeout is an answer, and is not retried.
    """
    probe = functools.partial(
        measure_rates,
        p2p,
        peer_id,
        upload_bytes=DOCTOR_PROBE_BYTES,
        download_bytes=DOCTOR_PROBE_BYTES,
        timeout_s=timeout_s,
    )
    try:
        return await probe()
    except PeerRefusedError:
        raise
    except (WireError, ConnectionError) as e:
        logger.info("probe to %s failed (%s); trying once more", peer_id, e)
    return await probe()


async def measure_link(address: str, *, timeout_s: float) -> tuple[float, float]:
    """(upload, download) bytes/s to the aggregator at multiaddr `address`, with the doctor's probe.

    Raises ValueError for a malformed address; ConnectionError, ProbeUnavailableError, WireError or
    asyncio.TimeoutError (each with one line) when it cannot be measured.
    """
    from hivemind.p2p import P2PDaemonError

    maddr, peer_id = parse_join_address(address)
    try:
        async with _running_p2p(timeout_s=timeout_s, host_maddrs=_LISTEN_ALL, initial_peers=[maddr]) as p2p:
            return await _measure_rates_twice(p2p, peer_id, timeout_s=timeout_s)
    except P2PDaemonError as e:
        raise ConnectionError(f"cannot reach the aggregator: {daemon_reason(e)}") from None


def _mbit(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.1f} Mbit/s"


async def _connected_to(p2p: P2P, peer_id: PeerID, *, fallback: Multiaddr, timeout_s: float) -> list[Multiaddr]:
    """The addresses our p2pd is connected to `peer_id` at: a /dns4/ join address resolved, for the NAT guess."""
    from hivemind.p2p import P2PDaemonError

    try:
        peers = await asyncio.wait_for(p2p.list_peers(), timeout_s)
    except (P2PDaemonError, OSError, asyncio.TimeoutError) as e:
        logger.info("cannot list p2pd's connections (%s); comparing with the join address as given", e)
        return [fallback]
    return [a for info in peers if info.peer_id == peer_id for a in info.addrs] or [fallback]


async def _check_join(
    address: str, *, maddr: Multiaddr, peer_id: PeerID, timeout_s: float
) -> tuple[list[Check], list[Multiaddr], list[Multiaddr]]:
    """Dial one aggregator (as a bootstrap peer) and probe its rates; also returns our visible addresses and the
    aggregator's as connected to (none when it cannot be reached)."""
    from hivemind.p2p import P2PDaemonError

    name = f"join {address}"
    try:
        async with _running_p2p(timeout_s=timeout_s, host_maddrs=_LISTEN_ALL, initial_peers=[maddr]) as p2p:
            # p2pd dials its bootstrap peers before it reports ready, so a started node is a connected one.
            reached = Check(name=name, status=Status.OK, detail=f"reached peer {peer_id}")
            seen = await asyncio.wait_for(p2p.get_visible_maddrs(latest=True), timeout_s)
            connected = await _connected_to(p2p, peer_id, fallback=maddr, timeout_s=timeout_s)
            try:
                up, down = await _measure_rates_twice(p2p, peer_id, timeout_s=timeout_s)
            except ProbeUnavailableError:
                probe = Check(
                    name=f"rates {address}",
                    status=Status.WARNING,
                    detail="the peer answers but serves no probe: not a potluck aggregator, or an older version",
                    fix="check the address with the aggregator's operator",
                )
            except asyncio.TimeoutError:
                probe = Check(
                    name=f"rates {address}",
                    status=Status.WARNING,
                    detail=f"a {DOCTOR_PROBE_BYTES // 2**20} MiB probe took over {timeout_s:g} s each way or both",
                    fix="your link is very slow or congested; training will lag (try --timeout 120 to measure)",
                )
            except (WireError, ConnectionError) as e:
                probe = Check(name=f"rates {address}", status=Status.WARNING, detail=str(e), fix="")
            else:
                probe = Check(
                    name=f"rates {address}", status=Status.OK, detail=f"upload {_mbit(up)}, download {_mbit(down)}"
                )
            return [reached, probe], seen, connected
    except (P2PDaemonError, asyncio.TimeoutError) as e:
        reason = daemon_reason(e) if isinstance(e, P2PDaemonError) else f"no answer within {timeout_s:g} s"
        unreachable = Check(
            name=name,
            status=Status.PROBLEM,
            detail=f"cannot reach the aggregator: {reason}",
            fix="check the address, that aggregator-server is running there, and that a firewall lets its port in",
        )
        return [unreachable], [], []


async def _check_page(url: str, *, timeout_s: float) -> tuple[Check, str | None]:
    """`--join http://...`: the status page answers with the aggregator's multiaddrs; the first one to try."""
    from potluck.peer.join_url import fetch_join_addresses
    from potluck.protocol.node import JoinError

    try:
        addresses = await asyncio.to_thread(fetch_join_addresses, url, timeout_s=timeout_s)
    except JoinError as e:
        fix = "check the URL (the aggregator's --http-port, and --http-host 0.0.0.0 for a public page)"
        return Check(name=f"page {url}", status=Status.PROBLEM, detail=str(e), fix=fix), None
    detail = f"the status page names the aggregator; trying {addresses[0]}"
    return Check(name=f"page {url}", status=Status.OK, detail=detail), addresses[0]


async def _network_checks(*, join: list[str], timeout_s: float) -> list[Check]:
    """p2pd starts, each --join address parses and answers (with rates), and whether we have a public address."""
    from hivemind.p2p import P2PDaemonError

    from potluck.peer.join_url import is_join_url

    checks: list[Check] = []
    seen: list[Multiaddr] = []
    joined: list[Multiaddr] = []  # the aggregators we reached: a public one and only private addresses here is NAT
    try:
        async with _running_p2p(timeout_s=timeout_s, host_maddrs=_LISTEN_ALL) as p2p:
            seen += await asyncio.wait_for(p2p.get_visible_maddrs(latest=True), timeout_s)
        p2pd_works = True
        checks.append(Check(name="p2pd", status=Status.OK, detail="the bundled libp2p daemon starts and stops"))
    except (P2PDaemonError, OSError, asyncio.TimeoutError) as e:
        p2pd_works = False
        reason = daemon_reason(e) if str(e) else f"no answer within {timeout_s:g} s"
        fix = (
            "reinstall hivemind (pip install --force-reinstall hivemind) and check that "
            "hivemind/hivemind_cli/p2pd is executable"
        )
        checks.append(Check(name="p2pd", status=Status.PROBLEM, detail=f"p2pd does not start: {reason}", fix=fix))
    for address in join:
        if is_join_url(address):
            page_check, listed = await _check_page(address, timeout_s=timeout_s)
            checks.append(page_check)
            if listed is None:
                continue
            address = listed
        try:
            maddr, peer_id = parse_join_address(address)
        except ValueError as e:
            fix = "pass --join exactly as aggregator-server printed it"
            checks.append(Check(name=f"join {address}", status=Status.PROBLEM, detail=str(e), fix=fix))
            continue
        if not p2pd_works:
            detail = "not tried: p2pd does not start"
            checks.append(Check(name=f"join {address}", status=Status.PROBLEM, detail=detail, fix="fix p2pd first"))
            continue
        join_checks, join_seen, connected = await _check_join(
            address, maddr=maddr, peer_id=peer_id, timeout_s=timeout_s
        )
        checks += join_checks
        seen += join_seen
        joined += connected
    if p2pd_works:
        checks.append(_reachability(seen, joined=joined))
    return checks


# --- report ---------------------------------------------------------------------------------------


_STYLE = {Status.OK: "green", Status.WARNING: "yellow", Status.PROBLEM: "bold red"}


def _print_report(checks: list[Check], *, as_json: bool) -> None:
    """The report on stdout: one line per check (colour on a terminal), or one JSON object."""
    ok = all(check.status is not Status.PROBLEM for check in checks)
    if as_json:
        report = {"checks": [{**asdict(check), "status": check.status.value} for check in checks], "ok": ok}
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)  # no colour when stdout is not a TTY
    for check in checks:
        line = Text()
        line.append(f"{check.status.value:<8}", style=_STYLE[check.status])
        line.append(f"{check.name}: {check.detail}")
        if check.fix:
            line.append(f"; fix: {check.fix}")
        console.print(line)
    problems = sum(check.status is Status.PROBLEM for check in checks)
    warnings_ = sum(check.status is Status.WARNING for check in checks)
    console.print(f"{problems} problem(s), {warnings_} warning(s)" if problems or warnings_ else "all checks ok")


def run_doctor(*, join: list[str], as_json: bool, timeout_s: float = 30.0) -> int:
    """Run every check, print the report on stdout, and return 0 when nothing is a problem, 1 otherwise.

    `join` holds the aggregator addresses to try (`--join`, may be empty); `timeout_s` bounds each network
    step (a p2pd start, a dial, one probe), not the whole run.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    checks = [check_versions()]
    checks += asyncio.run(_network_checks(join=join, timeout_s=timeout_s))
    checks += [check_device(), check_disk()]
    _print_report(checks, as_json=as_json)
    return 0 if all(check.status is not Status.PROBLEM for check in checks) else 1
