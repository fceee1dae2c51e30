"""How the swarm reports a child that exits: by its exit status, never by the words in its log."""

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from potluck.errors import DIVERGED_EXIT_STATUS, EXIT_STATUS
from potluck.lab.children import Child, pump
from potluck.lab.swarm import SwarmDiverged, SwarmError, _follow


def _follow_one(tmp_path: Path, last_line: str, status: int) -> SwarmError:
    """Run a child that logs `last_line` and exits with `status`; the error the swarm raises for it."""
    log_path = tmp_path / "peer-0.log"
    script = f"import sys; print({last_line!r}, file=sys.stderr); sys.exit({status})"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=log, text=True)
    child = Child(name="peer-0", process=process, log_path=log_path)
    events: queue.Queue = queue.Queue()
    threading.Thread(target=pump, args=(child, events), daemon=True).start()
    with pytest.raises(SwarmError) as info:
        _follow([child], events, lambda name, event: None, deadline=time.monotonic() + 60)
    return info.value


def test_a_diverged_peer_is_told_by_its_status_not_its_words(tmp_path: Path) -> None:
    error = _follow_one(tmp_path, "potluck: error: the loss is NaN", DIVERGED_EXIT_STATUS)
    assert isinstance(error, SwarmDiverged)
    assert str(error) == f"peer-0 exited with status {DIVERGED_EXIT_STATUS}: the loss is NaN"


def test_a_one_line_error_is_its_line_and_not_a_divergence(tmp_path: Path) -> None:
    error = _follow_one(tmp_path, "potluck: error: local training diverged in round 2", EXIT_STATUS)
    assert not isinstance(error, SwarmDiverged)
    assert str(error) == f"peer-0 exited with status {EXIT_STATUS}: local training diverged in round 2"


def test_a_crash_names_the_log_with_its_traceback(tmp_path: Path) -> None:
    error = _follow_one(tmp_path, "RuntimeError: a bug", 1)
    assert not isinstance(error, SwarmDiverged)
    assert str(error) == f"peer-0 exited with status 1: RuntimeError: a bug (log: {tmp_path / 'peer-0.log'})"
