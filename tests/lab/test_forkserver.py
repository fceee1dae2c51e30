"""The fork server: children forked from it behave as `python -m MODULE ARGS` subprocesses do."""

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from potluck.lab.children import start_child
from potluck.lab.forkserver import ForkedProcess, ForkServer

MODULE = "tests.forkserver_child"


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    started = ForkServer(preload=("json",))  # no torch: the behaviour under test is the forking
    yield started
    started.close()


_open: list[ForkedProcess] = []


@pytest.fixture(autouse=True)
def _close_pipes() -> Iterator[None]:
    yield
    while _open:
        child = _open.pop()
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        if child.stdout is not None:
            child.stdout.close()


def _start(
    server: ForkServer, tmp_path: Path, *args: str, env: dict[str, str] | None = None, nice: int = 0
) -> ForkedProcess:
    child = server.start(
        MODULE, list(args), env=env or dict(os.environ), cwd=Path.cwd(), log_path=tmp_path / "c.log", nice=nice
    )
    _open.append(child)
    return child


def _report(child: ForkedProcess) -> dict[str, object]:
    assert child.stdout is not None
    return json.loads(child.stdout.readline())


@pytest.mark.timeout(60)
def test_a_child_gets_its_arguments_environment_session_and_log_and_exits_with_its_status(
    server: ForkServer, tmp_path: Path
) -> None:
    child = _start(server, tmp_path, "exit", "3", env=dict(os.environ, FORKSERVER_TEST="yes"))
    report = _report(child)

    assert child.wait(timeout=20) == 3 and child.poll() == 3
    assert report["argv"] == ["exit", "3"] and report["env"] == "yes" and report["cwd"] == os.getcwd()
    assert report["pid"] == child.pid and report["sid"] == child.pid  # a session (process group) of its own
    assert report["sigint_default"] is True  # Ctrl-C raises KeyboardInterrupt in it, as in a fresh python
    assert (tmp_path / "c.log").read_text() == "to the log\n"
    assert child.stdout is not None and child.stdout.read() == ""  # its stdout closes when it exits


@pytest.mark.timeout(60)
def test_a_crash_is_status_one_with_its_traceback_in_the_log(server: ForkServer, tmp_path: Path) -> None:
    child = _start(server, tmp_path, "crash")

    assert child.wait(timeout=20) == 1
    assert "RuntimeError: boom" in (tmp_path / "c.log").read_text()


@pytest.mark.timeout(60)
def test_a_signalled_child_reports_minus_the_signal_and_waiting_on_a_live_one_times_out(
    server: ForkServer, tmp_path: Path
) -> None:
    child = _start(server, tmp_path, "hang")
    _report(child)

    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)  # its group, as stop_children kills it
    assert child.wait(timeout=20) == -signal.SIGKILL
    child.send_signal(signal.SIGTERM)  # after exit: nothing to signal, and no error


@pytest.mark.timeout(60)
def test_two_children_do_not_share_their_random_state(server: ForkServer, tmp_path: Path) -> None:
    first, second = _start(server, tmp_path, "report"), _start(server, tmp_path, "report")

    assert _report(first)["random"] != _report(second)["random"]
    assert first.wait(timeout=20) == 0 and second.wait(timeout=20) == 0


@pytest.mark.timeout(60)
def test_start_child_falls_back_to_a_subprocess_when_the_fork_server_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POTLUCK_FORKSERVER", "0")

    child = start_child("c", ["exit", "0"], work_dir=tmp_path, threads=1, module=MODULE)

    assert isinstance(child.process, subprocess.Popen)
    assert child.process.wait(timeout=30) == 0
    assert child.process.stdout is not None and json.loads(child.process.stdout.readline())["argv"] == ["exit", "0"]
    child.process.stdout.close()


@pytest.mark.timeout(60)
def test_a_closed_server_refuses_new_children_with_a_clear_error(tmp_path: Path) -> None:
    lone = ForkServer(preload=())
    lone.close()

    with pytest.raises(Exception, match="not running"):
        _start(lone, tmp_path, "report")


@pytest.mark.timeout(60)
def test_a_child_started_nice_yields_the_cpu_in_its_own_session_group_too(server: ForkServer, tmp_path: Path) -> None:
    plain, lowered = _start(server, tmp_path, "report"), _start(server, tmp_path, "report", nice=10)
    mine = os.getpriority(os.PRIO_PROCESS, 0)

    plain_report, lowered_report = _report(plain), _report(lowered)

    assert plain_report["nice"] == mine and lowered_report["nice"] == max(10, mine)
    if lowered_report["autogroup_nice"] is not None:  # Linux with autogroups: nice alone ranks only within a group
        assert lowered_report["autogroup_nice"] == max(10, mine) and plain_report["autogroup_nice"] != 10
    assert plain.wait(timeout=20) == 0 and lowered.wait(timeout=20) == 0


@pytest.mark.timeout(60)
def test_a_subprocess_child_started_nice_yields_the_cpu_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTLUCK_FORKSERVER", "0")

    child = start_child("c", ["hang"], work_dir=tmp_path, threads=1, module=MODULE, nice=10)

    try:
        assert isinstance(child.process, subprocess.Popen)
        expected = max(10, os.getpriority(os.PRIO_PROCESS, 0))
        assert os.getpriority(os.PRIO_PROCESS, child.process.pid) == expected  # set before start_child returned
        autogroup = Path(f"/proc/{child.process.pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == str(expected)
    finally:
        os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait(timeout=30)
        assert child.process.stdout is not None
        child.process.stdout.close()
