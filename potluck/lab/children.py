"""The swarm's children: start one as `python -m MODULE ARGS` in a session of its own, read the events it prints,
and stop them all so that no child or libp2p daemon outlives the swarm.

Each child and its libp2p daemon form one process group: stopping signals every group, waits, and kills
what is left. Children report through JSON lines on stdout; their logs go to files in the swarm's work
directory, whose last line says why a child failed. Every launcher (`potluck swarm`, `potluck redteam`, the
bench harnesses) stops what it started on Ctrl-C, SIGTERM and its timeout: `sigterm_unwinds` turns SIGTERM
into Ctrl-C's unwinding, and `run_launcher` runs a launcher as a child without orphaning the launcher's own.
"""

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potluck.errors import DIVERGED_EXIT_STATUS, ERROR_PREFIX, EXIT_STATUS
from potluck.events import Event, EventError, decode_event
from potluck.lab.forkserver import ForkedProcess, ForkServerError, shared_server
from potluck.lab.priority import lower_priority

logger = logging.getLogger(__name__)

STOP_GRACE_S = 15.0  # after SIGTERM, how long a child may take to shut its node down cleanly
LAUNCHER_GRACE_S = 2 * STOP_GRACE_S  # after SIGTERM, how long a launcher may take to stop its own children


@dataclass(kw_only=True, slots=True)
class Child:
    """A started child process, its log file and the events it reported."""

    name: str
    process: "subprocess.Popen[str] | ForkedProcess"
    log_path: Path
    events: list[Event] = field(default_factory=list)


def threads_per_process(peers: int, cores: int | None = None) -> int:
    """Torch threads each of the swarm's N+1 processes gets: an equal share of the cores, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // (peers + 1))


def _command(*args: str, module: str = "potluck") -> list[str]:
    return [sys.executable, "-m", module, *args]


def start_child(
    name: str,
    args: list[str],
    *,
    work_dir: Path,
    threads: int,
    module: str = "potluck",
    wrap: Callable[[list[str]], list[str]] | None = None,
    nice: int = 0,
) -> Child:
    """`python -m MODULE ARGS` in a new session, stdout piped (JSON lines), stderr to WORK_DIR/NAME.log.

    Forked from this process's fork server (potluck.lab.forkserver: torch and hivemind imported once)
    where it runs; otherwise, or when `wrap` turns the command into another one (the network lab
    puts it in a namespace), a plain subprocess. `nice` > 0 lowers its CPU priority (potluck.lab.priority).
    """
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads),  # before torch starts: OpenMP sizes its pool once
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    log_path = work_dir / f"{name}.log"
    server = shared_server() if wrap is None else None
    if server is not None:
        try:
            forked = server.start(module, args, env=env, cwd=Path.cwd(), log_path=log_path, nice=nice)
        except (OSError, ForkServerError) as e:
            logger.debug("fork server: %s; starting %s as a subprocess", e, name)
        else:
            return Child(name=name, process=forked, log_path=log_path)
    with open(log_path, "w") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            (wrap or (lambda argv: argv))(_command(*args, module=module)),
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: it and its p2pd are stopped together
        )
    lower_priority(nice, process.pid)  # Popen returns after the exec, so its new session has its autogroup
    return Child(name=name, process=process, log_path=log_path)


def pump(child: Child, events: "queue.Queue[tuple[Child, Event | None]]") -> None:
    """Forward a child's JSON lines to the queue; None when its stdout closes."""
    for event in read_events(child):
        events.put((child, event))
    events.put((child, None))


def read_json_lines(child: Child) -> Iterator[dict[str, Any]]:
    """The JSON objects a child prints, one a line, until its stdout closes (then closed here too)."""
    stream = child.process.stdout
    assert stream is not None
    try:
        for line in stream:
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                yield data
    except (ValueError, OSError):  # closed under us by stop_children
        return
    finally:
        stream.close()


def read_events(child: Child) -> Iterator[Event]:
    """The events a child prints (`--json`) until its stdout closes.

    A line that is not an event of this version is the child's bug: it is logged and skipped.
    """
    for data in read_json_lines(child):
        try:
            yield decode_event(data)
        except EventError as e:
            logger.error("%s printed a line that is no event (%s): %.200s", child.name, e, json.dumps(data))


def last_log_line(child: Child) -> str:
    """The last line a child logged, our own error prefix trimmed: what the swarm shows when it fails."""
    try:
        lines = [line.strip() for line in child.log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].removeprefix(ERROR_PREFIX) if lines else "(empty log)"


def why(child: Child, code: int | None) -> str:
    """A child's last log line; where it did not exit with a one-line error (a bug's traceback), its log's path too."""
    line = last_log_line(child)
    return line if code in (EXIT_STATUS, DIVERGED_EXIT_STATUS) else f"{line} (log: {child.log_path})"


def stop_children(children: list[Child], *, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every child, wait up to `grace_s`, then SIGKILL their process groups (any p2pd left included)."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)  # the node stops its own p2pd; the group kill follows
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        signal_group(child, signal.SIGKILL)  # also reaps a p2pd its parent failed to stop
        if child.process.poll() is None:
            child.process.wait(timeout=10)
        if child.process.stdout is not None:
            child.process.stdout.close()


def signal_group(child: Child, sig: signal.Signals) -> None:
    """Send `sig` to a child's whole process group (it and its p2pd); one already gone is no error."""
    try:
        os.killpg(child.process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM unwinds like Ctrl-C (KeyboardInterrupt), so the children started inside are stopped.

    Without it SIGTERM (docker stop, systemd, `timeout`, kill) ends a launcher at once and leaves its
    children, each in a session of its own, running. Only the main thread can take signals; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_launcher(
    argv: Sequence[str], *, timeout_s: float | None = None, env: dict[str, str] | None = None
) -> "subprocess.CompletedProcess[str]":
    """`subprocess.run(argv, capture_output=True, text=True)` for a command that starts processes of its own.

    Interrupted (Ctrl-C, or SIGTERM inside `sigterm_unwinds`) or past `timeout_s`, the command gets SIGTERM
    and `LAUNCHER_GRACE_S` to stop its children; subprocess.run would SIGKILL it and orphan them.
    """
    process = subprocess.Popen(  # noqa: S603 - the caller's own command
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    except BaseException:
        process.terminate()
        try:
            process.communicate(timeout=LAUNCHER_GRACE_S)  # read on: a launcher blocked on a full pipe never exits
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    return subprocess.CompletedProcess(list(argv), process.returncode, out, err)
