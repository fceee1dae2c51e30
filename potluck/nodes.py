"""The nodes as Python objects: `potluck.Aggregator` and `potluck.Peer` run what `potluck aggregator` and
`potluck peer` run, in a background thread of the caller's process.

Each takes its command's options as keywords, validated by the command's own flags model (the same fields,
bounds and rules; a broken one is one PotluckError line), and makes its node the way the command does
(`potluck.cli.aggregator.aggregator_node`, `potluck.cli.peer.peer_node`) minus the terminal: events go to
`on_event` as the typed events of potluck.events, and there is no status page unless `http_port` is given.
A task may be given as an object: it is run under its name (`module:ClassName`, or `task_name`) and never
imported. `start()` returns once the node is up; `stop()` shuts it and its libp2p daemon down.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from potluck.cli.aggregator import AggregatorFlags, aggregator_node
from potluck.cli.common import DEFAULT_IDENTITY, DEFAULT_RECEIPTS, DEFAULT_STATE_DIR
from potluck.cli.peer import peer_node
from potluck.cli.peer_flags import PeerFlags
from potluck.errors import PotluckError
from potluck.events import AggregatorDone, AggregatorReady, Event, PeerDone, PeerSynced
from potluck.protocol.config import RunConfig
from potluck.protocol.stopping import quiet_about_cancellation
from potluck.tasks import Task

__all__ = ["Aggregator", "NodeError", "Peer"]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # a peer's start: finding the aggregator, the state's download, the task's build
STOP_TIMEOUT_S = 60.0

Model = TypeVar("Model", bound=BaseModel)
Node = TypeVar("Node", bound="_NodeThread")


class NodeError(PotluckError):
    """A node object was given an unusable option, used out of order, or did not start or stop in time."""


class _NodeThread:
    """A node served in a thread of its own with its own asyncio loop: start, wait, stop, context manager."""

    KIND: ClassVar[str] = "node"

    def __init__(self, on_event: Callable[[Event], None] | None) -> None:
        self._on_event = on_event
        self._lock = threading.Lock()
        self._settled = threading.Event()  # up, or ended before it was
        self._ended = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self._failure: BaseException | None = None

    def _make(self) -> Coroutine[Any, Any, None]:
        """Make the node (in the caller's thread, so a bad config fails there) and return what runs it."""
        raise NotImplementedError

    def _seen(self, event: Event) -> bool:
        """Note what the node says; True when `event` means it is up."""
        raise NotImplementedError

    def _event(self, event: Event) -> None:
        if self._seen(event):
            self._settled.set()
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # the user's callback: a bug there must not take the node down
                logger.exception("on_event raised on a %r event; the %s goes on", event.KIND, self.KIND)

    def start(self: Node, timeout_s: float = START_TIMEOUT_S) -> Node:
        """Make and start the node; return once it is up, or raise (one line) what kept it from starting."""
        with self._lock:
            if self._thread is not None:
                raise NodeError(f"this {self.KIND} was started already; make a new one to start another")
            main = self._make()
            thread = self._thread = threading.Thread(
                target=self._serve, args=(main,), name=f"potluck-{self.KIND}", daemon=True
            )
            thread.start()
        atexit.register(self.stop)  # a script that never calls stop() still leaves no p2pd behind
        if not self._settled.wait(timeout_s):
            self.stop()
            raise NodeError(f"the {self.KIND} did not start within {timeout_s:.0f} s")
        if self._ended.is_set():  # it failed, or had nothing to do (a peer of a run already over)
            thread.join()
            atexit.unregister(self.stop)
            self._raise_failure()
        return self

    def _serve(self, main: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            with self._lock:
                self._loop, self._main = asyncio.get_running_loop(), asyncio.current_task()
                self._loop.set_exception_handler(quiet_about_cancellation)
                stopping = self._stopping
            if stopping:
                main.close()
                return
            await main

        try:
            asyncio.run(guarded())
        except asyncio.CancelledError:
            pass  # stop()
        except BaseException as e:  # noqa: BLE001 - raised in the user's thread by start(), wait() or `with`
            self._failure = e
        finally:
            self._ended.set()
            self._settled.set()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def running(self) -> bool:
        """Whether the node has been started and has not ended."""
        return self._thread is not None and not self._ended.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the node to end (its max_rounds, or the run's end); False on timeout. Raises what stopped it."""
        thread = self._thread
        if thread is None:
            raise NodeError(f"this {self.KIND} has not been started; call start() first")
        if not self._ended.wait(timeout_s):
            return False
        thread.join()
        self._raise_failure()
        return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the node where it is (as Ctrl-C stops the command) and wait for it and its p2pd; idempotent."""
        with self._lock:
            self._stopping = True
            loop, main, thread = self._loop, self._main, self._thread
        atexit.unregister(self.stop)
        if thread is None:
            return
        if loop is not None and main is not None and not self._ended.is_set():
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: it has ended
                loop.call_soon_threadsafe(main.cancel)
        if threading.current_thread() is thread:
            return  # stop() from an on_event callback: the node stops once the callback returns
        thread.join(timeout_s)
        if thread.is_alive():
            raise NodeError(f"the {self.KIND} did not stop within {timeout_s:.0f} s")

    def run(self) -> None:
        """Start the node and block until it ends (its max_rounds, the run's end, or Ctrl-C), then stop it."""
        self.start()
        try:
            self.wait()
        finally:
            self.stop()

    def __enter__(self: Node) -> Node:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
        if kind is None:
            self._raise_failure()


class Aggregator(_NodeThread):
    """An aggregator: what `potluck aggregator` runs, as an object. `start()`, then give peers `addresses`.

    `config`: the run (a RunConfig, or a TOML/YAML file; None: the embedded tiny run, or the run stored in
    `state_dir`). `task`: the run's task when it is your own: a Task object (run under `task_name`, by
    default its class's `module:ClassName`), or its import path. `settings`: config fields to override, as
    `--set` does (`{"rounds": 3, "inner.lr": 1e-3}`). `http_port`: serve the status page there (None: no page).
    `on_event`: called on the node's thread with each event (AggregatorReady, RoundClosed, ...). Any other
    option of `potluck aggregator` by its field name (`wait_for_peers=2`, `announce=(...)`, `threads=1`, ...).
    """

    KIND = "aggregator"
    _NOT_OPTIONS = frozenset({"config", "task", "set_", "as_json"})

    def __init__(
        self,
        config: RunConfig | str | Path | None = None,
        *,
        task: Task | str | None = None,
        task_name: str | None = None,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        host: str = "127.0.0.1",
        port: int = 0,
        max_rounds: int | None = None,
        settings: Mapping[str, Any] | None = None,
        http_port: int | None = None,
        on_event: Callable[[Event], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(on_event)
        if config is not None and not isinstance(config, RunConfig | str | Path):
            raise NodeError(f"config must be a RunConfig or a config file's path, not {type(config).__name__}")
        self._task_name, self._task = _task(task, task_name)
        values = {
            **_options(options, AggregatorFlags, self._NOT_OPTIONS, owner="Aggregator"),
            "config": None if config is None or isinstance(config, RunConfig) else Path(config),
            "task": self._task_name,
            "state_dir": Path(state_dir),
            "host": host,
            "port": port,
            "max_rounds": max_rounds,
            "set_": _settings(settings),
            "http_port": 0 if http_port is None else http_port,
        }
        self.flags = _validated(AggregatorFlags, values, owner="Aggregator")
        self._config = config if isinstance(config, RunConfig) else None
        self._ready: AggregatorReady | None = None
        self.result: AggregatorDone | None = None  # how it ended, once it has

    def _make(self) -> Coroutine[Any, Any, None]:
        _, main = aggregator_node(self.flags, on_event=self._event, config=self._config, task=self._task)
        return main

    def _seen(self, event: Event) -> bool:
        if isinstance(event, AggregatorDone):
            self.result = event
        if isinstance(event, AggregatorReady):
            self._ready = event
            return True
        return False

    @property
    def ready(self) -> AggregatorReady:
        """What the aggregator said when it came up: the run, its round, the state's held-out loss, ..."""
        if self._ready is None:
            raise NodeError("the aggregator is not up yet; call start() first")
        return self._ready

    @property
    def addresses(self) -> tuple[str, ...]:
        """The multiaddrs peers join (`Peer(join=...)`, `potluck peer --join`)."""
        return self.ready.maddrs


class Peer(_NodeThread):
    """A volunteer: what `potluck peer` runs, as an object. `start()`, then `wait()` for it to end.

    `join`: the aggregator's multiaddr(s) or status page URL, or a started Aggregator of this process.
    `task`: the run's task when it is its operator's own: a Task object (run under `task_name`, by default
    its class's `module:ClassName`; it must be the name the run has), or its import path. `device`: auto, cpu,
    cuda or cuda:N. `http_port`: serve this peer's status there (None: no page). `on_event`: called on the
    node's thread with each event (PeerSynced, PeerRound, ..., PeerDone). Any other option of `potluck peer`
    by its field name (`batch_size=8`, `eval_batches=2`, `threads=1`, ...). `result`: its PeerDone, once over.
    """

    KIND = "peer"
    _NOT_OPTIONS = frozenset({"join", "task", "as_json"})

    def __init__(
        self,
        join: str | Sequence[str] | Aggregator,
        *,
        task: Task | str | None = None,
        task_name: str | None = None,
        identity: str | Path = DEFAULT_IDENTITY,
        max_rounds: int | None = None,
        device: str = "auto",
        receipts: str | Path = DEFAULT_RECEIPTS,
        http_port: int | None = None,
        on_event: Callable[[Event], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(on_event)
        self._task_name, self._task = _task(task, task_name)
        values = {
            **_options(options, PeerFlags, self._NOT_OPTIONS, owner="Peer"),
            "join": _joins(join),
            "task": self._task_name,
            "identity": Path(identity),
            "max_rounds": max_rounds,
            "device": _device(device),
            "receipts": Path(receipts),
            "http_port": 0 if http_port is None else http_port,
        }
        self.flags = _validated(PeerFlags, values, owner="Peer")
        self.synced: PeerSynced | None = None  # the state it joined with, once it has
        self.result: PeerDone | None = None  # what it did, once it is over

    def _make(self) -> Coroutine[Any, Any, None]:
        _, main = peer_node(self.flags, on_event=self._event, task=self._task)
        return main

    def _seen(self, event: Event) -> bool:
        if isinstance(event, PeerDone):
            self.result = event
        if isinstance(event, PeerSynced):
            self.synced = event
            return True
        return False


def _task(task: Task | str | None, name: str | None) -> tuple[str | None, Task | None]:
    """The run's task as a node takes it: the name it goes by (None: a built-in) and the object, if given."""
    if task is None:
        if name is not None:
            raise NodeError("task_name names a Task object; give the object too (task=...)")
        return None, None
    if isinstance(task, str):
        if name is not None:
            raise NodeError(f"task={task!r} is already a name; task_name only applies to a Task object")
        return task, None
    if isinstance(task, type):
        raise NodeError(f"task={task.__name__} is a class; give an instance (task={task.__name__}(...))")
    if not isinstance(task, Task):
        raise NodeError(f"task must be a potluck.Task or its import path, not a {type(task).__name__}")
    if name is not None:
        return name, task
    cls = type(task)
    if "." in cls.__qualname__ or "<" in cls.__qualname__:
        raise NodeError(
            f"task class {cls.__qualname__} is not at the top of its module; name it: task_name='package.module:Name'"
        )
    return f"{cls.__module__}:{cls.__qualname__}", task


def _options(
    options: Mapping[str, Any], model: type[BaseModel], taken: frozenset[str], *, owner: str
) -> dict[str, Any]:
    """The extra keyword options, each one a field of the command's flags that the object does not take itself."""
    for name in options:
        if name in taken or name not in model.model_fields:
            raise NodeError(f"{owner}() takes no option {name!r}")
    return dict(options)


def _validated(model: type[Model], values: Mapping[str, Any], *, owner: str) -> Model:
    """The command's flags model from the object's options; NodeError (one line, by keyword) when invalid."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as e:
        first = e.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if first["type"] == "value_error" and isinstance(cause, Exception):
            raise NodeError(f"{owner}: {cause}") from None
        where = ".".join(str(part) for part in first["loc"])
        raise NodeError(f"{owner}({where}=...): {first['msg']}") from None


def _settings(settings: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Config fields to override, as `--set key=value` flags read back to the same values."""
    flags = []
    for key, value in (settings or {}).items():
        try:
            flags.append(f"{key}={json.dumps(value)}")
        except (TypeError, ValueError):
            raise NodeError(
                f"settings[{key!r}]: {value!r} is not a config value (a number, string, bool or list)"
            ) from None
    return tuple(flags)


def _joins(join: str | Sequence[str] | Aggregator) -> tuple[str, ...]:
    """What `join` names, as `--join` values (an Aggregator of this process: its multiaddrs)."""
    if isinstance(join, Aggregator):
        return join.addresses
    if isinstance(join, str):
        return (join,)
    if not isinstance(join, Sequence) or not all(isinstance(value, str) for value in join):
        raise NodeError("join must be a multiaddr, a status page URL, a list of them, or an Aggregator")
    if not join:
        raise NodeError("join is empty; give the aggregator's multiaddr or status page URL")
    return tuple(join)


def _device(device: str) -> str:
    """`device` if this machine has it (NodeError, one line, if not): the peer would fail only once started."""
    from potluck.training.device import pick_device

    try:
        pick_device(device)
    except (ValueError, RuntimeError) as e:
        raise NodeError(f"device: {e}") from None
    return device
