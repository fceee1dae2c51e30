"""`potluck redteam --attack <network attack>`: an honest swarm, calm and then with an attacker process against it.

The update-behaviour attacks (attacks.py) are peers of the run that send bad updates. A network attack is a
process from outside the run, with no key of it, that hits the aggregator's resources and what it believes:
one of the attackers of potluck.lab.attackers, started once the attacked swarm's aggregator is ready (with its
join address and status-page port) and stopped with the swarm's own children, however the run ends.

Both swarms are the same run with every peer honest; the report compares them: the median round time (round 0,
which waits for the peers to join, left out), the rounds closed by their deadline, the honest uploads the
aggregator never counted, and the attacker's own counters, which show it ran.
"""

import contextlib
import math
import socket
import statistics
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potluck.events import AggregatorReady, Event
from potluck.lab.children import Child, read_json_lines, start_child, stop_children
from potluck.lab.redteam.harness import rates
from potluck.lab.swarm import SwarmOptions, SwarmResult, run_swarm
from potluck.protocol.config import RunConfig

SLOWDOWN_BOUND = 1.5  # the attacked run's median round time, at most this many times the calm run's
ATTACKER_NICE = 19  # its own CPU use on this machine is no cost a remote attacker could put on the swarm
ATTACKER_READY_S = 90.0  # how long the peers wait for the attacker to report that it attacks (it starts a node)


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """Where the attacked swarm can be reached."""

    join: str  # the aggregator's multiaddr
    http_port: int  # its status page on 127.0.0.1


@dataclass(frozen=True, kw_only=True, slots=True)
class NetworkAttack:
    """One attacker program and the arguments it is started with against a target."""

    module: str
    args: Callable[[Target], list[str]]
    what: str


NETWORK_ATTACKS: dict[str, NetworkAttack] = {
    "silent-streams": NetworkAttack(
        module="potluck.lab.attackers.streams",
        args=lambda t: ["--join", t.join, "--silent", "64", "--unread", "0"],
        what="64 submit streams that send a header and then nothing",
    ),
    "unread-replies": NetworkAttack(
        module="potluck.lab.attackers.streams",
        args=lambda t: ["--join", t.join, "--silent", "0", "--unread", "64"],
        what="64 chunk requests whose replies are never read",
    ),
    "dht-strangers": NetworkAttack(
        module="potluck.lab.attackers.dht_records",
        args=lambda t: ["--join", t.join],
        what="stranger-signed announcements (other version, other run, own key, real node) and a ban list",
    ),
    "fake-joiners": NetworkAttack(
        module="potluck.lab.attackers.fake_joiners",
        args=lambda t: ["--join", t.join, "--every", "1"],
        what="a manifest request under a fresh random key every second",
    ),
    "stranger-uploads": NetworkAttack(
        module="potluck.lab.attackers.stranger_uploads",
        args=lambda t: ["--join", t.join],
        what="uploads each signed by a fresh key, of another run",
    ),
    "http-flood": NetworkAttack(
        module="potluck.lab.attackers.http_flood",
        args=lambda t: ["--port", str(t.http_port), "--connections", "2000", "--spread", "50"],
        what="2,000 half-open HTTP requests to the status page",
    ),
}


def attacker_counters(lines: list[dict[str, Any]]) -> dict[str, int]:
    """The attacker's counters from the JSON lines it printed, the latest value of each.

    Attackers print cumulative counts: a number is kept as it is, a list as its length (the records stored),
    and a mapping as one counter per key ("answers.run"); the event's name and times are no counters.
    """
    counters: dict[str, int] = {}

    def note(name: str, value: Any) -> None:
        if isinstance(value, bool) or name in ("event", "time_s"):
            return
        if isinstance(value, int):
            counters[name] = value
        elif isinstance(value, list):
            counters[name] = len(value)
        elif isinstance(value, dict):
            for key, inner in value.items():
                note(f"{name}.{key}", inner)

    for line in lines:
        for name, value in line.items():
            note(name, value)
    return counters


def run_summary(result: SwarmResult) -> dict[str, Any]:
    """One swarm's row: rounds, median round time after round 0, deadline closes (which rounds), the round each
    peer joined at, honest uploads kept and lost."""
    timed = [r["round_s"] for r in result.rounds if r["round"] > 0] or [r["round_s"] for r in result.rounds]
    counted = rates(result)
    return {
        "rounds": result.rounds_completed,
        "median_round_s": statistics.median(timed) if timed else None,
        "closed_by_deadline": sum(r["closed_by"] == "deadline" for r in result.rounds),
        "deadline_rounds": [r["round"] for r in result.rounds if r["closed_by"] == "deadline"],
        "joined_rounds": [p.get("joined_round") for p in result.peers],  # an attack on joining shows here
        "honest_accepted": counted["honest_updates"] - counted["honest_rejected"],
        "honest_rejected": counted["honest_rejected"],
        "final_val_loss": result.final_val_loss,
    }


def network_verdict(report: dict[str, Any]) -> dict[str, bool]:
    """The bars: round time within 1.5x calm, no honest upload lost and no deadline close beyond the calm run's,
    and the attack ran (some counter of the attacker's above zero)."""
    calms, attacked = _calm_rows(report), report["attacked"]
    ratio = report["round_time_ratio"]
    return {
        "round_time_within_1.5x": ratio is not None and ratio <= SLOWDOWN_BOUND,
        "no_honest_update_lost": attacked["honest_rejected"] <= max(c["honest_rejected"] for c in calms),
        "no_deadline_round": attacked["closed_by_deadline"] <= max(c["closed_by_deadline"] for c in calms),
        "attack_ran": any(v > 0 for v in report["attacker"].values()),
    }


def _calm_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [report["calm"], *([report["calm_after"]] if report.get("calm_after") else [])]


def round_time_ratio(report: dict[str, Any]) -> float | None:
    """The attacked run's median round time over the slower calm run's (the machine's load drifts between runs)."""
    calm_s = [c["median_round_s"] for c in _calm_rows(report) if c["median_round_s"]]
    attacked_s = report["attacked"]["median_round_s"]
    return None if not calm_s or attacked_s is None else attacked_s / max(calm_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Attacker:
    """The attacker process of one swarm: started on the aggregator's ready event, its JSON lines collected."""

    def __init__(self, attack: NetworkAttack, *, http_port: int, work_dir: Path) -> None:
        self.attack, self.http_port, self.work_dir = attack, http_port, work_dir
        self.child: Child | None = None
        self.lines: list[dict[str, Any]] = []
        self._reader: threading.Thread | None = None
        self._reported = threading.Event()

    def on_event(self, child: str, event: Event) -> None:
        """Start the attacker once the (first) aggregator is ready, and hold the peers' start until it attacks.

        Called on the swarm's thread between the aggregator's ready event and the peers' start, so the attack
        is under way for all of the attacked run (or the attacker has failed, or not reported for a long while).
        """
        if self.child is None and child == "aggregator" and isinstance(event, AggregatorReady):
            args = self.attack.args(Target(join=event.maddrs[0], http_port=self.http_port))
            self.child = start_child(
                "attacker", args, work_dir=self.work_dir, threads=1, module=self.attack.module, nice=ATTACKER_NICE
            )
            self._reader = threading.Thread(target=self._read, args=(self.child,), daemon=True)
            self._reader.start()
            for _ in range(int(ATTACKER_READY_S / 0.5)):
                if self._reported.wait(0.5) or self.child.process.poll() is not None:
                    break

    def _read(self, child: Child) -> None:
        for line in read_json_lines(child):
            self.lines.append(line)
            if any(v > 0 for v in attacker_counters([line]).values()):  # it has done something: it attacks
                self._reported.set()
        self._reported.set()

    def stop(self) -> None:
        """Stop it (its libp2p daemon too) and wait for the last lines it printed."""
        if self.child is None:
            return
        stop_children([self.child])
        if self._reader is not None:
            self._reader.join(timeout=5)

    def log_tail(self) -> str:
        """The last line it logged (why it failed, if it did)."""
        if self.child is None:
            return "(never started)"
        with contextlib.suppress(OSError):
            lines = self.child.log_path.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "(empty log)"
        return "(no log)"


def run_network_redteam(
    cfg: RunConfig,
    *,
    attack: str,
    peers: int,
    calm_after: bool = False,
    timeout_s: float = 1800.0,
    on_event: Callable[[str, str, Event], None] = lambda run, child, event: None,
) -> dict[str, Any]:
    """Run the swarm calm, then with `attack`'s attacker against its aggregator (then calm again when `calm_after`:
    on a shared machine the load drifts between runs, and the slower calm run is the baseline); the report."""
    if attack not in NETWORK_ATTACKS:
        raise ValueError(f"unknown network attack {attack!r}; choose one of: {', '.join(NETWORK_ATTACKS)}")
    with tempfile.TemporaryDirectory(prefix="potluck-redteam-net-") as tmp:

        def swarm(name: str, attacker: _Attacker | None) -> SwarmResult:
            def follow(child: str, event: Event) -> None:
                if attacker is not None:
                    attacker.on_event(child, event)
                on_event(name, child, event)

            port = attacker.http_port if attacker is not None else _free_port()
            options = SwarmOptions(peers=peers, cfg=cfg, http_port=port, timeout_s=timeout_s)
            return run_swarm(options, on_event=follow)

        calm = swarm("calm", None)
        attacker = _Attacker(NETWORK_ATTACKS[attack], http_port=_free_port(), work_dir=Path(tmp))
        try:
            attacked = swarm("attacked", attacker)
        finally:
            attacker.stop()
        report: dict[str, Any] = {
            "attack": attack,
            "what": NETWORK_ATTACKS[attack].what,
            "peers": peers,
            "round_deadline_s": cfg.round_deadline_s,
            "calm": run_summary(calm),
            "attacked": run_summary(attacked),
            "attacker": attacker_counters(attacker.lines),
        }
        if calm_after:
            report["calm_after"] = run_summary(swarm("calm after", None))
        report["round_time_ratio"] = round_time_ratio(report)
        if not any(v > 0 for v in report["attacker"].values()):
            report["attacker_log"] = attacker.log_tail()
        return report


def network_to_json_ready(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its verdict, a non-finite number written as None (JSON has no NaN)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return clean(report) | {"verdict": network_verdict(report)}
