"""What a run trains: the Task seam and the built-in tasks (see potluck.tasks.base)."""

from potluck.tasks.base import Batch, Task, TaskError, architecture_fingerprint
from potluck.tasks.init_weights import InitWeightsError, initial_model
from potluck.tasks.registry import (
    TaskMismatch,
    allow_task,
    check_task,
    check_tokenizer,
    created,
    load_task,
    run_shapes,
    run_task,
    task_for,
)

__all__ = [
    "Batch",
    "InitWeightsError",
    "Task",
    "TaskError",
    "TaskMismatch",
    "allow_task",
    "architecture_fingerprint",
    "check_task",
    "check_tokenizer",
    "created",
    "initial_model",
    "load_task",
    "run_shapes",
    "run_task",
    "task_for",
]
