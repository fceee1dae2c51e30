"""`potluck export` and `potluck sample`: the trained model out of an aggregator's state directory.

`export` writes the latest state as something loaded without potluck: for a Hugging Face run a
`save_pretrained` directory with its tokenizer, for any other task a safetensors file and a JSON
that says what it is. `sample` continues a prompt with a language-model run's latest state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from potluck.cli.common import UsageError, stdout
from potluck.errors import PotluckError

if TYPE_CHECKING:
    import torch.nn as nn

    from potluck.protocol.config import RunConfig
    from potluck.tasks import Task


class ExportError(PotluckError):
    """The state directory holds no model that can be exported here (one line, with the fix)."""


STATE_DIR_HELP = "An aggregator's state directory (potluck swarm names the one it kept)."
TASK_HELP = "The run's task when it is one of your own: package.module:attribute."


def _latest(state_dir: Path, task_name: str | None) -> tuple[RunConfig, Task, nn.Module, int]:
    """The run in `state_dir`, its task, its model at the latest checkpoint, and that checkpoint's round."""
    from potluck.aggregator_server.checkpoint import load_checkpoint
    from potluck.aggregator_server.setup import RUN_FILE
    from potluck.protocol.config_files import load_run_config
    from potluck.tasks import allow_task, run_task
    from potluck.training.diloco import load_params

    if not (state_dir / RUN_FILE).is_file():
        raise ExportError(f"{state_dir} holds no {RUN_FILE}: give an aggregator's --state-dir")
    cfg = load_run_config(state_dir / RUN_FILE)
    if cfg.shards > 1:
        raise ExportError(f"run {cfg.run_name!r} is cut into {cfg.shards} shards; one state directory holds one")
    if task_name is not None:
        allow_task(task_name)
    checkpoint = load_checkpoint(state_dir, config_hash=cfg.config_hash)
    if checkpoint is None:
        raise ExportError(f"{state_dir} holds no checkpoint yet: the run has not closed a round")
    task = run_task(cfg)
    model = task.build_model(seed=cfg.seed)
    load_params(model, checkpoint.params)
    return cfg, task, model, checkpoint.round


def export(
    state_dir: Annotated[Path, typer.Option("--state-dir", help=STATE_DIR_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="A new directory to write the model to.")],
    task: Annotated[str | None, typer.Option("--task", help=TASK_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Write a run's latest model where other tools load it (Hugging Face runs: AutoModelForCausalLM)."""
    out = out.expanduser()
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty; name a new directory")
    cfg, run_task, model, closed = _latest(state_dir.expanduser(), task)
    out.mkdir(parents=True, exist_ok=True)
    about = {"task": cfg.task.name, "run": cfg.run_name, "round": closed, "config_hash": cfg.config_hash}
    files = run_task.export(model, out, run=about)
    if as_json:
        stdout.print_json(json.dumps({**about, "out": str(out), "files": files}))
    else:
        stdout.print(f"exported run {cfg.run_name!r} at round {closed} ({cfg.task.name}) to {out}: {', '.join(files)}")


def sample(
    state_dir: Annotated[Path, typer.Option("--state-dir", help=STATE_DIR_HELP)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to continue.")] = "",
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens to generate.", min=1, max=100_000)] = 200,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: always the likeliest).", min=0)] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among this many likeliest tokens.", min=1)] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.", min=0)] = 0,
) -> None:
    """Continue a prompt with a language-model run's latest state."""
    from potluck.tasks.language import LanguageModelTask

    _, run_task, model, _ = _latest(state_dir.expanduser(), None)
    if not isinstance(run_task, LanguageModelTask):
        raise ExportError(f"the run's task {type(run_task).__name__} is not a language model: nothing to sample")
    text = run_task.generate(model, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed)
    stdout.print(text, markup=False, highlight=False, soft_wrap=True)
