"""A launcher run by another (a bench harness running `potluck swarm`) is stopped with SIGTERM, never SIGKILL:
SIGKILL would leave the processes it started, each in a session of its own, running."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from potluck.lab.children import run_launcher, sigterm_unwinds

# A stand-in launcher: says it is ready, then waits; on SIGTERM it writes how it was stopped and exits.
LAUNCHER = """
import pathlib, signal, sys
out = pathlib.Path(sys.argv[1])
def stop(*_):
    (out / "stopped").write_text("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "ready").touch()
while True:
    signal.pause()
"""


def _sigterm_self_once(ready: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or `docker stop` would stop the harness


@pytest.mark.timeout(60)
def test_sigterm_to_a_harness_stops_the_launcher_it_runs_with_sigterm(tmp_path: Path) -> None:
    # Prepare
    previous = signal.getsignal(signal.SIGTERM)
    signaller = threading.Thread(target=_sigterm_self_once, args=(tmp_path / "ready",), daemon=True)
    signaller.start()
    # Execute
    with pytest.raises(KeyboardInterrupt), sigterm_unwinds():
        run_launcher([sys.executable, "-c", LAUNCHER, str(tmp_path)], timeout_s=50)
    # Assert
    signaller.join(timeout=5)
    assert (tmp_path / "stopped").read_text() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == previous  # the harness's own handling is back afterwards


def test_a_launcher_that_finishes_gives_its_status_and_output() -> None:
    done = run_launcher([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
