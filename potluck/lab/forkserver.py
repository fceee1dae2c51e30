"""A fork server for local swarms: one Python that has imported torch and hivemind forks every child.

A swarm's children each spent ~3 CPU-seconds importing torch, hivemind and potluck before doing
anything; on a 2-core machine a swarm of seven paid ~10 s of wall time for it, and a test suite of
thirty swarms paid minutes. The server imports once, then forks on request: each child is still a
real OS process in a session of its own (it and its p2pd form one process group), with its own
stdout pipe, its own log file as stderr, its own environment and working directory, running
`python -m MODULE ARGS` as `runpy` runs it, and exiting with that command's status.

The launcher talks to the server over a Unix socketpair: a request is one JSON datagram with the
child's stdout and stderr descriptors attached (SCM_RIGHTS); the server answers with the pid, and
later with the exit status once it has reaped the child. If the server cannot start, or dies, the
launcher falls back to plain `subprocess.Popen` (see `potluck.lab.children.start_child`).

Not for the network lab: its children must start inside a namespace, which `ip netns exec` does.
"""

import atexit
import contextlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from potluck.errors import PotluckError
from potluck.lab.priority import lower_priority

# What every swarm child imports; the server imports it once so that its children need not. torch._dynamo
# (and sympy with it) is not imported by torch itself but by the first optimizer a peer builds: seconds of a
# child's first round on a loaded machine. potluck.cli.node_web brings FastAPI and uvicorn, which every node
# imports for its status page: ~0.4 CPU-seconds a child.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "hivemind",
    "potluck.cli.app",
    "potluck.cli.node_web",
    "potluck.peer.runner",
    "potluck.peer.serverless",
    "potluck.aggregator_server.server",
    "potluck.lab.redteam.peer",
)
START_TIMEOUT_S = 120.0  # the server's own imports, on a loaded 2-core machine
MAX_MESSAGE = 1 << 20  # a request is argv, env and cwd: far below this


class ForkServerError(PotluckError):
    """The fork server could not start a child (the caller falls back to a plain subprocess)."""


def _exit_code(status: int) -> int:
    """Popen's convention: the exit status, or -N for a child killed by signal N."""
    return os.waitstatus_to_exitcode(status)


def _run_child(request: dict[str, Any], stdout_fd: int, stderr_fd: int) -> int:
    """In the forked child: become `python -m MODULE ARGS` in a session of its own; its exit status."""
    os.setsid()
    lower_priority(int(request.get("nice", 0)))  # after setsid: the new session's autogroup is its own
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    for fd in (null, stdout_fd, stderr_fd):
        os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = request["env"].get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and "torch" in sys.modules:  # OpenMP read the server's value at import
        sys.modules["torch"].set_num_threads(int(threads))
    # The server's global random states would otherwise be every child's (python's own random reseeds itself).
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = [request["module"], *request["args"]]
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - a child's crash is reported as python would, then its status
        traceback.print_exc()
        code = 1
    # What interpreter exit would do: join non-daemon threads, then atexit (multiprocessing stops its daemons).
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]  # private: what interpreter exit calls
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _say(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the launcher is gone: the next receive sees it and ends the loop
        sock.send(json.dumps(message).encode())


def serve(sock: socket.socket) -> None:
    """The server's loop: fork a child per request, report each child's exit; return when the launcher goes."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: set[int] = set()
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is wake_r:
                os.read(wake_r, 4096)
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 2)
            except OSError:
                data, fds = b"", []
            if not data:
                return  # the launcher closed its end (or died): its children are its to stop
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                _say(sock, {"error": "a request needs stdout and stderr descriptors"})
                continue
            request = json.loads(data)
            pid = os.fork()
            if pid == 0:
                selector.close()
                sock.close()
                os.close(wake_r)
                os.close(wake_w)
                os._exit(_run_child(request, *fds))
            children.add(pid)
            for fd in fds:
                os.close(fd)
            _say(sock, {"pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                _say(sock, {"exited": pid, "code": _exit_code(status)})


class ForkedProcess:
    """A child the fork server started: the part of `subprocess.Popen`'s interface the swarm uses."""

    def __init__(self, server: "ForkServer", pid: int, stdout: TextIO) -> None:
        self._server = server
        self.pid = pid
        self.stdout: TextIO | None = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the server has reaped the child, else None."""
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child has exited (subprocess.TimeoutExpired after `timeout` seconds)."""
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        """Signal the child unless it has already exited (its pid may be someone else's by now)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM, as Popen.terminate."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as Popen.kill."""
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The launcher's handle on a running fork server; `start` forks a child through it."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._lock = threading.Lock()  # one request and its answer at a time
        self._changed = threading.Condition()
        self._exits: dict[int, int] = {}
        self._answers: list[dict[str, Any]] = []
        self._alive = True
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "potluck.lab.forkserver", str(theirs.fileno()), *preload],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C at the terminal is the launcher's to handle, not the server's
        )
        theirs.close()
        threading.Thread(target=self._read, name="forkserver-reader", daemon=True).start()
        answer = self._answer(START_TIMEOUT_S)
        if answer.get("ready") is not True:
            self.close()
            raise ForkServerError(f"the fork server did not start: {answer.get('error', 'no answer')}")

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            with self._changed:
                if not data:
                    self._alive = False
                    self._changed.notify_all()
                    return
                message = json.loads(data)
                if "exited" in message:
                    self._exits[int(message["exited"])] = int(message["code"])
                else:
                    self._answers.append(message)
                self._changed.notify_all()

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        with self._changed:
            if not self._changed.wait_for(lambda: self._answers or not self._alive, timeout=timeout_s):
                return {"error": f"no answer within {timeout_s:.0f} s"}
            return self._answers.pop(0) if self._answers else {"error": "the fork server exited"}

    @property
    def alive(self) -> bool:
        """Whether the server still answers."""
        return self._alive and self._process.poll() is None

    def start(
        self, module: str, args: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, nice: int = 0
    ) -> ForkedProcess:
        """`python -m MODULE ARGS` forked from the server; stdout piped back as text, stderr to `log_path`;
        `nice` > 0 lowers the child's CPU priority (potluck.lab.priority)."""
        request = json.dumps({"module": module, "args": args, "env": env, "cwd": str(cwd), "nice": nice}).encode()
        read_fd, write_fd = os.pipe()
        try:
            with open(log_path, "w") as log, self._lock:
                if not self.alive:
                    raise ForkServerError("the fork server is not running")
                socket.send_fds(self._sock, [request], [write_fd, log.fileno()])
                answer = self._answer(30.0)
        except (OSError, ForkServerError):
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        if "pid" not in answer:
            os.close(read_fd)
            raise ForkServerError(str(answer.get("error", answer)))
        return ForkedProcess(self, int(answer["pid"]), open(read_fd, encoding="utf-8", errors="replace"))

    def exit_code(self, pid: int) -> int | None:
        """The child's exit status if it has exited (1 if the server died and the child is gone)."""
        with self._changed:
            if pid in self._exits:
                return self._exits[pid]
            if not self._alive and not Path(f"/proc/{pid}").exists():
                return 1  # reaped by init after the server went: its status is lost
            return None

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        """Block until the child's exit status is known, or `timeout` seconds; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.exit_code(pid)
            if code is not None:
                return code
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            with self._changed:  # woken by the reader; the 0.5 s bound catches a child orphaned by a dead server
                self._changed.wait(timeout=0.5 if left is None else min(0.5, left))

    def close(self) -> None:
        """Stop the server (its children, in sessions of their own, are the launcher's to stop)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


_shared: ForkServer | None = None
_shared_lock = threading.Lock()
_shared_failed = False


def shared_server() -> ForkServer | None:
    """This process's fork server, started on first use; None where it cannot run (then use Popen)."""
    global _shared, _shared_failed
    if os.environ.get("POTLUCK_FORKSERVER", "1") == "0" or sys.platform != "linux":
        return None
    with _shared_lock:
        if _shared is not None and not _shared.alive:
            _shared = None
        if _shared is None and not _shared_failed:
            try:
                _shared = ForkServer()
            except (OSError, ForkServerError):
                _shared_failed = True  # once: a launcher must not pay a failed start per child
                return None
            atexit.register(_shared.close)
        return _shared


def main(fd: int, preload: list[str]) -> None:
    """The server process: import `preload`, say ready, serve until the launcher closes the socket."""
    sock = socket.socket(fileno=fd)
    try:
        for name in preload:
            __import__(name)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, which falls back to Popen
        _say(sock, {"error": f"preloading failed: {e}"})
        return
    _say(sock, {"ready": True})
    serve(sock)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
