"""The weights a run starts from (task.init_from), loaded into its model at creation, tensor by tensor by name.

The run's config holds the sha256 of a safetensors file in this machine's store (potluck.protocol.weights_files
keeps it there when a local run.toml names the file). Its tensors fill the model's parameters by name: the
model's own names (what `potluck export` writes for any task), or a `save_pretrained` checkpoint's, which are
the same for a transformers model or lack its `base_model_prefix` (a base model's checkpoint). A parameter
tied to another (an lm_head sharing the embeddings) is filled from either name, as transformers ties them.
Every parameter must be there with its shape, and a tensor the model has no place for marks another
architecture's weights: both are refused in one line before the run starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from potluck.errors import PotluckError
from potluck.protocol.config import RunConfig
from potluck.protocol.weights_files import weights_file
from potluck.tasks.base import Task, TaskError

__all__ = ["InitWeightsError", "check_init_weights", "initial_model"]

_SHOWN = 3  # tensor names a refusal lists before "..."


class InitWeightsError(TaskError):
    """The weights a run starts from do not fit its model: a tensor missing, misshaped or of another model."""


def initial_model(cfg: RunConfig, task: Task) -> nn.Module:
    """The run's model at round 0: `task`'s build from the run's seed, then the run's init_from weights, if any."""
    model = task.build_model(seed=cfg.seed)
    if cfg.task.init_from is None:
        return model
    with _opened(cfg.task.init_from) as (held, read):
        sources = _sources(model, held, sha=cfg.task.init_from)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(read(sources[name]))
    return model


def check_init_weights(cfg: RunConfig, task: Task) -> None:
    """Refuse init_from weights that do not fit `task`'s model (from the file's header alone; nothing is loaded)."""
    if cfg.task.init_from is not None:
        with _opened(cfg.task.init_from) as (held, _):
            _sources(task.skeleton(), held, sha=cfg.task.init_from)


@contextmanager
def _opened(sha: str) -> Iterator[tuple[dict[str, tuple[int, ...]], Any]]:
    """The stored weights `sha`: each tensor's shape by name, and a function that reads one tensor."""
    from safetensors import safe_open

    path: Path = weights_file(sha)
    try:
        with safe_open(str(path), framework="pt") as opened:
            held = {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}
            yield held, opened.get_tensor
    except PotluckError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of bad file
        raise InitWeightsError(
            f"init_from weights {sha[:12]} ({path}) cannot be read: {' '.join(str(e).split())}"
        ) from None


def _sources(model: nn.Module, held: dict[str, tuple[int, ...]], *, sha: str) -> dict[str, str]:
    """For each of the model's parameters, the name of the held tensor that fills it; InitWeightsError if any lacks."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    names_of: dict[int, list[str]] = {}  # a tied parameter has several names, all of one tensor
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    sources: dict[str, str] = {}
    missing: list[str] = []
    for name, parameter in model.named_parameters():
        found = [key for alias in names_of[id(parameter)] for key in _spellings(alias, prefix) if key in held]
        if not found:
            missing.append(name)
        elif held[found[0]] != tuple(parameter.shape):
            raise InitWeightsError(
                f"init_from weights {sha[:12]}: tensor {found[0]} has shape {list(held[found[0]])}, the run's model's "
                f"{name} {list(parameter.shape)}; the weights are of another architecture than the run's config"
            )
        else:
            sources[name] = found[0]
    if missing:
        raise InitWeightsError(
            f"init_from weights {sha[:12]} lack {len(missing)} of the model's tensors ({_listed(missing)}); "
            "the weights are of another architecture than the run's config"
        )
    known = {
        key
        for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        for key in _spellings(name, prefix)
    }
    unused = sorted(held.keys() - known)
    if unused:
        raise InitWeightsError(
            f"init_from weights {sha[:12]} hold {len(unused)} tensors the run's model has no place for "
            f"({_listed(unused)}); the weights are of another architecture than the run's config"
        )
    return sources


def _spellings(name: str, prefix: str) -> list[str]:
    """How a checkpoint may name the model's tensor `name`: as it is, or without the base model's prefix."""
    if prefix and name.startswith(prefix + "."):
        return [name, name[len(prefix) + 1 :]]
    return [name]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
