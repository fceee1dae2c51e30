"""From a run's config to its task: the built-in ones by name, a volunteer's own by import path.

A run's operator can only *name* a task. ``package.module:attribute`` is imported from the local Python
installation of whoever runs a node, as any installed package is; nothing is fetched over the network or
read from the run's config bytes. And it is imported only when this node's own user named it too
(`--task`, or a Task object given to the Python API: `allow_task`): a run config comes from the network,
and importing and calling whatever it names would let any aggregator run code on a volunteer's machine.
"""

from __future__ import annotations

import importlib
import logging

from potluck.protocol.config import RunConfig
from potluck.tasks.base import Task, TaskError
from potluck.tasks.gpt import GPTTask
from potluck.tasks.hf import HFCausalLMTask
from potluck.tasks.init_weights import check_init_weights

__all__ = [
    "TaskMismatch",
    "allow_task",
    "check_task",
    "check_tokenizer",
    "created",
    "load_task",
    "run_shapes",
    "run_task",
    "task_for",
]

logger = logging.getLogger(__name__)

_allowed: dict[str, Task | None] = {}  # the tasks of their own this node's user named (a Task given as an object)
_tasks: dict[str, Task] = {}  # by config hash: a process serves one run, a hostile config list stays short
_TASKS_KEPT = 16


class TaskMismatch(TaskError):
    """This node's build of the run's task is not the model the run trains."""


def task_for(cfg: RunConfig, *, data_source: str | None = None) -> Task:
    """The task `cfg` names, built here; `data_source` replaces a language model's `data.source` (a peer's --data)."""
    if cfg.task.name == GPTTask.name:
        return GPTTask(cfg, data_source=data_source)
    if cfg.task.name == HFCausalLMTask.name:
        return HFCausalLMTask(cfg, data_source=data_source)
    if cfg.task.name not in _allowed:
        raise TaskError(
            f"the run trains task {cfg.task.name}, a task of its operator's own; to run it, install its package "
            f"and pass --task {cfg.task.name} (it is imported from your Python installation)"
        )
    if data_source is not None:
        logger.warning("--data does not apply to task %s, which reads its own data", cfg.task.name)
    given = _allowed[cfg.task.name]
    return given if given is not None else load_task(cfg.task.name, cfg.task.params)


def allow_task(ref: str, task: Task | None = None) -> None:
    """Let this node run the task of its own named `ref` (its user asked for it); `task`: the object itself."""
    _allowed[ref] = task


def run_task(cfg: RunConfig) -> Task:
    """The run's task as this process builds it, once per config, checked against the run's fingerprint.

    TaskMismatch when this node's build is another architecture than the run records: the node's own
    problem (another version of the task's code), never the fault of whoever sent the config.
    """
    key = cfg.config_hash
    if key not in _tasks:
        task = task_for(cfg)
        check_task(cfg, task)
        if len(_tasks) >= _TASKS_KEPT:
            _tasks.clear()
        _tasks[key] = task
    return _tasks[key]


def check_tokenizer(cfg: RunConfig, brought: str | None) -> None:
    """Refuse a run whose tokenizer is not the one this node's user brought (`brought`: its sha256, or None)."""
    if brought is None or brought == cfg.data.tokenizer:
        return
    theirs = "bytes, no tokenizer file" if cfg.data.tokenizer is None else f"sha256 {cfg.data.tokenizer[:12]}"
    raise TaskMismatch(
        f"this node's --tokenizer (sha256 {brought[:12]}) is another tokenizer than the run's ({theirs}); "
        "bring the run's tokenizer.json, or leave --tokenizer out and use the one that comes with the run"
    )


def run_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes of the run's model, in its order."""
    return run_task(cfg).parameter_shapes()


def load_task(ref: str, params: dict[str, int | float | str | bool]) -> Task:
    """The task at ``package.module:attribute``: a Task, or a callable that returns one given `params`."""
    module_name, _, attribute = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is theirs to see, in one line
        raise TaskError(
            f"task {ref}: cannot import {module_name} here ({type(e).__name__}: {e}); "
            "install the package the run names, as its operator says"
        ) from None
    target = getattr(module, attribute, None)
    if target is None:
        raise TaskError(f"task {ref}: module {module_name} has no attribute {attribute}")
    if isinstance(target, Task):
        if params:
            raise TaskError(f"task {ref} is a Task object; it takes no task.params")
        return target
    if not callable(target):
        raise TaskError(f"task {ref} is a {type(target).__name__}, not a Task or a callable that returns one")
    try:
        task = target(**params)
    except Exception as e:  # noqa: BLE001 - as above
        raise TaskError(f"task {ref} failed to build: {type(e).__name__}: {e}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task {ref} returned a {type(task).__name__}, not a potluck Task")
    return task


def created(cfg: RunConfig) -> RunConfig:
    """`cfg` as a new run records it: with its task's architecture fingerprint (checked if already there).

    Weights the run starts from (task.init_from) must fit the model: checked here, before the run exists.
    """
    task = task_for(cfg)
    found = task.fingerprint()
    if cfg.task.fingerprint is not None and cfg.task.fingerprint != found:
        raise TaskMismatch(
            f"task {cfg.task.name}: the config's architecture fingerprint {cfg.task.fingerprint[:12]} is not "
            f"this build's {found[:12]}; the task's code or its parameters changed since the run was created"
        )
    check_init_weights(cfg, task)
    if cfg.task.fingerprint is None:
        return cfg.model_copy(update={"task": cfg.task.model_copy(update={"fingerprint": found})})
    return cfg


def check_task(cfg: RunConfig, task: Task) -> None:
    """Refuse to train `task` for the run `cfg` unless it builds the architecture the run records."""
    if cfg.task.fingerprint is None:
        return
    found = task.fingerprint()
    if found != cfg.task.fingerprint:
        raise TaskMismatch(
            f"task {cfg.task.name}: this node builds another architecture than the run's "
            f"(fingerprint {found[:12]}, the run's {cfg.task.fingerprint[:12]}); "
            "install the version of the task the run's operator names"
        )
