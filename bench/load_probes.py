"""What the load generator watches besides its workers: the aggregator's /proc, its status page, the DHT records.

`ProcSampler` reads the aggregator's CPU time and RSS (and its libp2p daemon's) from /proc twice a second;
`StatusProber` times GET /api/status once a second; `DhtProbe` looks the run's DHT keys up through a client
node of its own and measures what comes back. Each keeps its samples with their Unix times, so the launcher
cuts them into rounds afterwards.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process and its children: Unix time, CPU seconds so far, resident MB now."""

    time_s: float
    cpu_s: float
    rss_mb: float
    daemon_cpu_s: float  # its libp2p daemon's (children's), counted apart
    daemon_rss_mb: float


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds) of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _stat(int(entry))[0] == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


class ProcSampler(threading.Thread):
    """Samples a process (the aggregator) and its children (its p2pd) until stopped."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every_s = every_s
        self.samples: list[ProcSample] = []
        self.halt = threading.Event()

    def run(self) -> None:
        """Sample until `halt` is set or the process is gone (children looked up again every 10 samples)."""
        kids: list[int] = []
        n = 0
        while not self.halt.is_set():
            try:
                if n % 10 == 0:
                    kids = _children(self.pid)
                _, cpu = _stat(self.pid)
                rss = _rss_mb(self.pid)
            except (OSError, IndexError, ValueError):
                return
            kid_cpu = kid_rss = 0.0
            for kid in kids:
                try:
                    kid_cpu += _stat(kid)[1]
                    kid_rss += _rss_mb(kid)
                except (OSError, IndexError, ValueError):
                    continue
            self.samples.append(ProcSample(time.time(), cpu, rss, kid_cpu, kid_rss))
            n += 1
            self.halt.wait(self.every_s)

    def window(self, start_s: float, end_s: float) -> dict[str, float | None]:
        """CPU share (1.0 = one core) and peak RSS of the process and of its daemon between two Unix times."""
        inside = [s for s in self.samples if start_s <= s.time_s <= end_s]
        if len(inside) < 2:
            return {"cpu": None, "rss_mb": inside[0].rss_mb if inside else None, "p2pd_cpu": None, "p2pd_rss_mb": None}
        first, last = inside[0], inside[-1]
        span = last.time_s - first.time_s
        return {
            "cpu": round((last.cpu_s - first.cpu_s) / span, 3),
            "rss_mb": round(max(s.rss_mb for s in inside), 1),
            "p2pd_cpu": round((last.daemon_cpu_s - first.daemon_cpu_s) / span, 3),
            "p2pd_rss_mb": round(max(s.daemon_rss_mb for s in inside), 1),
        }


class StatusProber(threading.Thread):
    """Times GET http://127.0.0.1:PORT/api/status every `every_s` seconds until stopped."""

    def __init__(self, port: int, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.every_s = every_s
        self.samples: list[tuple[float, float | None]] = []  # (Unix time, seconds; None: failed)
        self.halt = threading.Event()

    def run(self) -> None:
        """Probe until `halt` is set."""
        url = f"http://127.0.0.1:{self.port}/api/status"
        while not self.halt.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - our own loopback page
                    reply.read()
                took: float | None = time.perf_counter() - started
            except OSError:
                took = None
            self.samples.append((time.time(), took))
            self.halt.wait(self.every_s)

    def window(self, start_s: float, end_s: float) -> dict[str, float | int | None]:
        """The median and the slowest status reply between two Unix times, and how many failed."""
        inside = [t for at, t in self.samples if start_s <= at <= end_s]
        ok = sorted(t for t in inside if t is not None)
        return {
            "status_p50_s": round(ok[len(ok) // 2], 4) if ok else None,
            "status_max_s": round(ok[-1], 4) if ok else None,
            "status_failed": len(inside) - len(ok),
        }


class DhtProbe:
    """A client DHT node of its own, on a thread's event loop, that measures the run's records when asked."""

    def __init__(self, join: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.node: Any = None
        self.join = join

    def _run(self, coroutine: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def start(self) -> None:
        """Start the node (a DHT client bootstrapped from the aggregator)."""
        from potluck.protocol.node import start_node

        self.node = self._run(start_node(initial_peers=[self.join], client_mode=True), 60)

    def sizes(self) -> dict[str, dict[str, int]]:
        """For the run's announcement key: subkeys found and their values' bytes (a lookup's size).

        The identities serve no state, so they write no holder records (bench/dht_records.py sizes those).
        """
        from potluck.protocol.dht_schema import AGGREGATORS_KEY

        found: dict[str, dict[str, int]] = {}
        for key in (AGGREGATORS_KEY,):
            try:
                result = self._run(self.node.dht.get(key, latest=True), 30)
            except (TimeoutError, OSError):
                continue
            entries = getattr(result, "value", None)
            if not isinstance(entries, dict):
                found[key] = {"subkeys": 0, "bytes": 0}
                continue
            size = sum(len(getattr(v, "value", b"")) + len(repr(k)) for k, v in entries.items())
            found[key] = {"subkeys": len(entries), "bytes": size}
        return found

    def stop(self) -> None:
        """Stop the node and the thread's loop."""
        if self.node is not None:
            try:
                self._run(self.node.shutdown(), 15)
            except (TimeoutError, OSError):
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
