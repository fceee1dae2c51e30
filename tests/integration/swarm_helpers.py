"""Shared tools for the multi-process tests: start potluck nodes as real processes, read their events, clean up.

Children run `python -m potluck ...` in sessions of their own (see potluck.lab.children.start_child), so a
test can SIGKILL a node together with its p2pd, and the `nodes` fixture kills every group it
started, whatever the test did. `p2pd_pids()` scans /proc so tests can assert that nothing is left.
"""

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from potluck.lab.children import Child, read_json_lines, start_child, stop_children
from potluck.protocol.density import round_codecs
from potluck.protocol.envelope import SignedState, SignedUpdate, UpdateHeader, new_nonce, payload_digest, sign_update
from potluck.protocol.identity import Identity
from potluck.protocol.messages import decode_state_payload
from potluck.training.models import model_config, parameter_shapes

Printed = dict[str, Any]  # one JSON object a node printed on stdout (`--json`): the interface scripts read


def p2pd_pids(*, sessions: Collection[int] | None = None) -> set[int]:
    """Every running p2pd on this machine, or only those in `sessions` (the sessions of the nodes a test started:
    a node's p2pd stays in its session even once orphaned, and daemons other test runs start meanwhile do not)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            state, session = fields[0], int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
        if b"p2pd" in cmdline.split(b"\0")[0] and state != "Z" and (sessions is None or session in sessions):
            found.add(int(proc.name))
    return found


def p2pd_children() -> list[int]:
    """PIDs of this process's own p2pd children (for tests that start P2P nodes in-process)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if ppid == os.getpid() and b"p2pd" in cmdline:
            found.append(int(proc.name))
    return found


def signed_test_update(
    state: SignedState,
    state_payload: bytes,
    *,
    sender: Identity,
    tokens: int,
    seed: int = 0,
    density: float | None = None,
) -> tuple[SignedUpdate, bytes]:
    """A well-formed update for the state's open round, signed by `sender` (a small random delta).

    Encoded at the round's upload density, or at `density` (on the run's ladder) to send a wrong one.
    """
    cfg, params, _, _ = decode_state_payload(state_payload)
    codec, _ = round_codecs(cfg, state.header.density if density is None else density)
    model_shapes = parameter_shapes(model_config(cfg.model.size, block_size=cfg.model.block_size))
    shapes = {name: shape for name, shape in model_shapes.items() if name in params}  # a shard's, in a sharded run
    generator = torch.Generator().manual_seed(seed)
    payload = codec.encode({n: torch.randn(s, generator=generator) * 1e-3 for n, s in shapes.items()}, {})
    header = UpdateHeader(
        run_id=cfg.run_name,
        config_hash=cfg.config_hash,
        round=state.header.round,
        base_version=state.header.new_version,
        peer_public_key=sender.public_key,
        tokens=tokens,
        inner_steps=8,
        codec=codec.name,
        payload_bytes=len(payload),
        payload_sha256=payload_digest(payload),
        nonce=new_nonce(),
        timestamp_s=time.time(),
    )
    return sign_update(header, sender), payload


def wait_until(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for an aggregator that must come back on the same port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(kw_only=True)
class Node:
    """A started node and the events it has printed so far."""

    child: Child
    events: "queue.Queue[Printed | None]" = field(default_factory=queue.Queue)
    seen: list[Printed] = field(default_factory=list)

    def next_event(self, predicate: Callable[[Printed], bool], *, timeout_s: float) -> Printed:
        """The first event (already seen or still to come) matching `predicate`."""
        for event in self.seen:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.child.name}: no matching event in {timeout_s:.0f} s; log:\n{self.log()}")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if event is None:
                self.events.put(None)  # stdout closed: every later wait fails fast too
                raise AssertionError(f"{self.child.name} exited ({self.child.process.poll()}); log:\n{self.log()}")
            self.seen.append(event)
            if predicate(event):
                return event

    def all_events(self, *, timeout_s: float) -> list[Printed]:
        """Every event the node reported, once its stdout has closed (it exited, or was killed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.child.name}: stdout still open after {timeout_s:.0f} s")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if event is None:
                self.events.put(None)
                return list(self.seen)
            self.seen.append(event)

    def wait_exit(self, *, timeout_s: float) -> int:
        """The exit status; fails the test if the process is still running after `timeout_s`."""
        try:
            return self.child.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.child.name} still running after {timeout_s:.0f} s; log:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the node and its p2pd at once: a crash, not a shutdown."""
        os.killpg(self.child.process.pid, signal.SIGKILL)
        self.child.process.wait(timeout=10)

    def log(self) -> str:
        return self.child.log_path.read_text(errors="replace")[-3000:]


class Nodes:
    """Starts nodes for one test and stops them all at teardown."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.started: list[Node] = []

    def start(
        self, name: str, *args: str, module: str = "potluck", wrap: Callable[[list[str]], list[str]] | None = None
    ) -> Node:
        """`python -m MODULE ARGS --json` as a new process (one torch thread: tests share 2 cores).

        `wrap` turns the command into another one: the network lab's `command` runs it in a namespace.
        """
        child = start_child(
            name, [*args, "--threads", "1", "--json"], work_dir=self.work_dir, threads=1, module=module, wrap=wrap
        )
        node = Node(child=child)
        threading.Thread(target=_pump, args=(child, node.events), daemon=True).start()
        self.started.append(node)
        return node

    def aggregator(
        self,
        name: str = "aggregator",
        *,
        state_dir: Path | None = None,
        port: int = 0,
        extra: tuple[str, ...] = (),
        **settings: object,
    ) -> Node:
        """An aggregator on 127.0.0.1 with `--set key=value` for each setting, and `extra` arguments."""
        args = [
            "aggregator",
            "--state-dir",
            str(state_dir or self.work_dir / name),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http-port",
            "0",
        ]
        for key, value in settings.items():
            args += ["--set", f"{key.replace('__', '.')}={value}"]
        return self.start(name, *args, *extra)

    def peer(self, name: str, join: str, *args: str) -> Node:
        """A peer joining `join`, with its own key in the work directory."""
        if "--receipts" not in args:  # never the user's ~/.potluck
            args = (*args, "--receipts", str(self.work_dir / f"{name}-receipts"))
        return self.start(name, "peer", "--join", join, "--identity", str(self.work_dir / f"{name}.key"), *args)

    def stop(self) -> None:
        stop_children([n.child for n in self.started], grace_s=10)


def _pump(child: Child, events: "queue.Queue[Printed | None]") -> None:
    for event in read_json_lines(child):  # what the node printed: the interface scripts read
        events.put(event)
    events.put(None)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Start nodes in a test; every one of them (and its p2pd) is gone after it, and the test fails if not."""
    started = Nodes(tmp_path)
    try:
        yield started
    finally:
        started.stop()
    sessions = {node.child.process.pid for node in started.started}  # each node leads a session of its own
    wait_until(lambda: not p2pd_pids(sessions=sessions), timeout_s=20, what="every p2pd of the test to exit")


def alive_in_groups(groups: set[int]) -> set[int]:
    """Running (not zombie) processes in any of these process groups: the children and their p2pd."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.add(int(proc.name))
    return found
