"""`potluck simulate` and `potluck plan`: the science tools, which ask what a run would do before it runs.

`simulate` trains DiLoCo with each codec against DDP here, one peer after another; `plan` computes the scaling
efficiency of local SGD and the network time per round, from figures given or (`--auto`) measured here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from potluck.cli.common import UsageError, stderr, stdout
from potluck.cli.flags import as_written

if TYPE_CHECKING:
    from potluck.planning.plan import AutoPlan


def simulate(
    peers: Annotated[int, typer.Option(help="Simulated peers (run one after another).", min=1)] = 4,
    rounds: Annotated[
        int | None, typer.Option(help=as_written("Outer rounds. [default: 8, or the config's]"), min=1)
    ] = None,
    local_steps: Annotated[
        int | None, typer.Option(help=as_written("Inner steps per round (H). [default: 25, or the config's]"), min=1)
    ] = None,
    codecs: Annotated[
        str,
        typer.Option(help="Comma-separated arms, name[:param=value...] each, e.g. none,dct-topk:density=0.03."),
    ] = "none,int8,dct-topk",
    outer: Annotated[
        str | None, typer.Option(help=as_written("Outer optimizer: nesterov or average. [default: the config's]"))
    ] = None,
    config: Annotated[Path | None, typer.Option(help="A run config (TOML or YAML); flags override it.")] = None,
    data: Annotated[str | None, typer.Option(help="builtin, a text file, a directory, or hf:<saved dataset>.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per inner step per peer.", min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak inner AdamW learning rate.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Inner LR warmup steps.", min=0)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init and data order.", min=0)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    eval_batches: Annotated[int, typer.Option(help="Held-out batches per evaluation.", min=1)] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")] = (
        False
    ),
) -> None:
    """Compare DiLoCo with each codec against DDP at equal tokens: held-out loss and upload bytes."""
    from potluck.planning.simulate import simulate as run_simulation
    from potluck.protocol.config import RunConfig
    from potluck.protocol.config_files import load_run_config, run_config_from_mapping
    from potluck.training.device import pick_device

    base = load_run_config(config) if config else RunConfig(rounds=8, local_steps=25)
    overrides: dict[str, Any] = base.model_dump(mode="json")
    for section, key, value in [
        (None, "rounds", rounds),
        (None, "local_steps", local_steps),
        ("outer", "kind", outer),
        ("data", "source", data),
        ("inner", "batch_size", batch_size),
        ("inner", "lr", lr),
        ("inner", "warmup_steps", warmup_steps),
        (None, "seed", seed),
    ]:
        if value is not None:
            target = overrides if section is None else overrides[section]
            target[key] = value
    cfg = run_config_from_mapping(overrides, source="flags")
    from potluck.planning.simulate import parse_arm

    names = [c.strip() for c in codecs.split(",") if c.strip()]
    if not names:
        raise UsageError("--codecs names no codec; try --codecs none,int8,dct-topk")
    try:
        for name in names:
            parse_arm(name)
    except ValueError as err:
        raise UsageError(f"--codecs: {err}") from None
    total = cfg.rounds * cfg.local_steps * peers
    with Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    ) as progress:
        # DDP takes one step where the simulated peers take P, one after another.
        arms = ("ddp", *names)
        tasks = {arm: progress.add_task(arm, total=total // peers if arm == "ddp" else total) for arm in arms}

        def on_progress(arm: str, done: int, _total: int) -> None:
            progress.update(tasks[arm], completed=done)

        result = run_simulation(cfg, peers=peers, codecs=names, device=pick_device(device), on_progress=on_progress)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(
        title=f"{peers} peers, {cfg.rounds} rounds x {cfg.local_steps} inner steps, outer {cfg.outer.kind}",
        caption="up B/step: upload bytes per peer per inner step; B/p: bytes per parameter; "
        "kstep: 1000 inner steps; rnd: round; less up: upload reduction against DDP's ring all-reduce",
    )
    # Short headers keep the table inside 80 columns when stdout is not a terminal; the caption explains them.
    for column in ("arm", "val loss", "vs DDP", "up B/step", "up B/p/kstep", "down B/p/rnd", "less up"):
        table.add_column(column, justify="right")
    for arm in result.arms:
        table.add_row(
            arm.name,
            f"{arm.val_loss:.4f}",
            f"{arm.gap_pct:+.2f}%",
            f"{arm.upload_bytes_per_peer_per_step:,.0f}",
            _number(arm.upload_bytes_per_param_per_kstep),
            _number(arm.download_bytes_per_param_per_round),
            f"{arm.reduction_vs_ddp:,.0f}x",
        )
    stdout.print(table)
    stdout.print(f"initial held-out loss {result.initial_val_loss:.4f}; model {result.num_params:,} parameters")


def _number(value: float) -> str:
    """Three significant digits without scientific notation: 6,000 / 40.5 / 0.0713."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _quantity(value: str | None, flag: str) -> float | None:
    from potluck.planning.plan import parse_quantity

    if value is None:
        return None
    try:
        return parse_quantity(value)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None


def plan(
    params: Annotated[str | None, typer.Option(help="Model parameters N (e.g. 1.2e9 or 1.2G).")] = None,
    clusters: Annotated[str | None, typer.Option(help="Clusters m that train apart and sync each round.")] = None,
    gpus_per_cluster: Annotated[str | None, typer.Option(help="GPUs per cluster n.")] = None,
    device_flops: Annotated[str | None, typer.Option(help="FLOP/s per device C_d (e.g. 150T).")] = None,
    bandwidth: Annotated[str | None, typer.Option(help="Link bandwidth W between clusters, bits/s.")] = None,
    batch_tokens: Annotated[str | None, typer.Option(help="Global batch B, tokens.")] = None,
    local_steps: Annotated[str | None, typer.Option(help="Local steps s per round.")] = None,
    target_k: Annotated[float, typer.Option(help="Scaling efficiency to find the local steps for.")] = 0.9,
    upload_bytes: Annotated[str | None, typer.Option(help="Payload uploaded per round, bytes (MB = 10^6).")] = None,
    download_bytes: Annotated[str | None, typer.Option(help="Payload downloaded per round, bytes.")] = None,
    up: Annotated[str | None, typer.Option(help="Upload rate, bits/s (e.g. 10M).")] = None,
    down: Annotated[str | None, typer.Option(help="Download rate, bits/s (e.g. 100M).")] = None,
    auto: Annotated[
        bool,
        typer.Option(
            "--auto",
            help="Measure instead: time a few inner steps of the run's model here, probe the link to --join "
            "(or take --up/--down), and report K for the run's settings and the local steps for K >= --target-k.",
        ),
    ] = False,
    join: Annotated[str | None, typer.Option(help="With --auto: the aggregator multiaddr to probe.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help=as_written("With --auto or --memory: the run config. [default: the embedded run]")
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="With --auto or --memory: override one config field; repeatable."),
    ] = None,
    peers: Annotated[int, typer.Option(help="With --auto: peers in the run (He et al.'s m).", min=1)] = 8,
    device: Annotated[
        str, typer.Option(help="With --auto: auto, cpu, cuda, cuda:N or mps. With --memory: cpu, or a GPU (auto).")
    ] = "auto",
    memory: Annotated[
        bool,
        typer.Option(
            "--memory",
            help="Estimate a peer's peak memory for the run's model instead: parameters, gradients, AdamW and outer "
            "state, activations and logits at the micro-batch.",
        ),
    ] = False,
    size: Annotated[
        str | None,
        typer.Option(help=as_written("With --memory: a built-in model size (tiny ... 1b). [default: the run's]")),
    ] = None,
    hf_config: Annotated[
        Path | None, typer.Option(help="With --memory: a Hugging Face config.json to estimate instead.")
    ] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option(
            help=as_written("With --memory: sequences per pass. [default: the run's inner.batch_size]"), min=1
        ),
    ] = None,
    seq: Annotated[
        int | None,
        typer.Option(help=as_written("With --memory: tokens per sequence. [default: the model's context]"), min=1),
    ] = None,
    checkpointing: Annotated[
        bool, typer.Option("--checkpointing/--no-checkpointing", help="With --memory: activation checkpointing.")
    ] = False,
    outer_on_cpu: Annotated[
        bool, typer.Option("--outer-on-cpu", help="With --memory: keep the outer state in host RAM.")
    ] = False,
    device_memory: Annotated[
        float | None, typer.Option(help="With --memory: the device's memory in GB (GiB, as cards are sold).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Scaling efficiency K of local SGD (He et al., arXiv 2409.13198) and network time per round."""
    from potluck.planning.plan import make_plan

    if memory:
        _memory_plan(
            config=config,
            overrides=set_ or [],
            size=size,
            hf_config=hf_config,
            setup=_MemoryFlags(
                micro_batch=micro_batch,
                seq=seq,
                device="cpu" if device.strip().lower() == "cpu" else "cuda",
                checkpointing=checkpointing,
                outer_on_cpu=outer_on_cpu,
            ),
            device_memory_gb=device_memory,
            as_json=as_json,
        )
        return
    if auto:
        up_bits, down_bits = _quantity(up, "--up"), _quantity(down, "--down")
        result = _auto_plan(
            join=join,
            config=config,
            overrides=set_ or [],
            peers=peers,
            device=device,
            target_k=target_k,
            up=up_bits,
            down=down_bits,
        )
        if as_json:
            print(json.dumps(result.to_dict()))
        else:
            stdout.print(result.line(), highlight=False)
        return

    values = {
        "params": _quantity(params, "--params"),
        "clusters": _quantity(clusters, "--clusters"),
        "gpus_per_cluster": _quantity(gpus_per_cluster, "--gpus-per-cluster"),
        "device_flops": _quantity(device_flops, "--device-flops"),
        "bandwidth_bits_per_s": _quantity(bandwidth, "--bandwidth"),
        "batch_tokens": _quantity(batch_tokens, "--batch-tokens"),
        "local_steps": _quantity(local_steps, "--local-steps"),
        "upload_bytes": _quantity(upload_bytes, "--upload-bytes"),
        "download_bytes": _quantity(download_bytes, "--download-bytes"),
        "up_bits_per_s": _quantity(up, "--up"),
        "down_bits_per_s": _quantity(down, "--down"),
    }
    try:
        made = make_plan(**values, target_k=target_k)
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = made.to_dict()
    if not any(v is not None for v in out.values()):
        raise UsageError(
            "nothing to compute: give --clusters --gpus-per-cluster --device-flops --bandwidth --batch-tokens "
            "--local-steps for K, or --upload-bytes/--download-bytes with --up/--down for transfer times"
        )
    if as_json:
        print(json.dumps(out))
        return
    shown = {key: value for key, value in out.items() if value is not None}
    width = max(map(len, shown))
    for key, value in shown.items():
        stdout.print(f"{key:>{width}}  {value:.4g}" if isinstance(value, float) else f"{key:>{width}}  {value}")


def _auto_plan(
    *,
    join: str | None,
    config: Path | None,
    overrides: list[str],
    peers: int,
    device: str,
    target_k: float,
    up: float | None,
    down: float | None,
) -> AutoPlan:
    """`plan --auto`: the self-benchmark (step time, payload sizes, link rates) and what it predicts."""
    import asyncio
    from dataclasses import asdict

    from potluck.cli.preflight import measure_link
    from potluck.planning.benchmark import measure_for_plan
    from potluck.planning.plan import auto_plan
    from potluck.protocol.config_files import parse_overrides, run_config_or_default
    from potluck.protocol.probe import ProbeUnavailableError
    from potluck.protocol.wire import WireError
    from potluck.training.device import pick_device

    if join is None and (up is None or down is None):
        raise UsageError("--auto needs --join ADDR to measure the link, or both --up and --down")
    parsed = parse_overrides(overrides)
    cfg = run_config_or_default(config, overrides=parsed)
    if join is not None:
        try:
            up_bytes, down_bytes = asyncio.run(measure_link(join, timeout_s=60.0))
        except ValueError as e:
            raise UsageError(f"--join: {e}") from None
        except (OSError, WireError, ProbeUnavailableError, asyncio.TimeoutError) as e:
            raise UsageError(f"could not measure the link to {join}: {e or 'timed out'}") from None
        up, down = up_bytes * 8, down_bytes * 8
    assert up is not None and down is not None
    with Progress(transient=True, console=stderr) as bar:
        bar.add_task("timing inner steps", total=None)
        figures = measure_for_plan(cfg, device=pick_device(device))
    try:
        return auto_plan(
            **asdict(figures),
            peers=peers,
            local_steps=cfg.local_steps,
            up_bits_per_s=up,
            down_bits_per_s=down,
            target_k=target_k,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class _MemoryFlags:
    """`plan --memory`'s flags about how the peer trains."""

    micro_batch: int | None
    seq: int | None
    device: Literal["cpu", "cuda"]
    checkpointing: bool
    outer_on_cpu: bool


def _memory_plan(
    *,
    config: Path | None,
    overrides: list[str],
    size: str | None,
    hf_config: Path | None,
    setup: _MemoryFlags,
    device_memory_gb: float | None,
    as_json: bool,
) -> None:
    """`plan --memory`: the estimate of a peer's peak memory for the run's model, and whether a device fits it."""
    from potluck.planning.memory import (
        HEADROOM,
        TrainingSetup,
        estimate_memory,
        fits,
        gpt_shape,
        hf_shape,
        load_hf_config,
    )
    from potluck.protocol.config_files import parse_overrides, run_config_or_default
    from potluck.training.models import model_config

    if device_memory_gb is not None and device_memory_gb <= 0:
        raise UsageError(f"--device-memory must be positive GB, got {device_memory_gb}")
    if hf_config is not None and size is not None:
        raise UsageError("--size and --hf-config both name a model; give one")
    cfg = run_config_or_default(config, overrides=parse_overrides(overrides))
    if hf_config is not None:
        shape = hf_shape(load_hf_config(hf_config), name=f"{hf_config.name}")
    elif cfg.task.name == "hf-causal-lm" and size is None:  # the run's own transformers model
        shape = hf_shape(cfg.task.hf_config_values(), name=str(cfg.task.hf_config_values()["model_type"]))
    else:
        try:
            gpt = model_config(size or cfg.model.size, block_size=cfg.model.block_size)
        except ValueError as e:
            raise UsageError(f"--size: {e}") from None
        shape = gpt_shape(gpt, name=f"gpt {size or cfg.model.size}")
    training = TrainingSetup(
        micro_batch=setup.micro_batch or cfg.inner.batch_size,
        seq=setup.seq,
        device=setup.device,
        activation_checkpointing=setup.checkpointing,
        outer_state_on_cpu=setup.outer_on_cpu,
        outer_momentum=cfg.outer.kind == "nesterov",
    )
    estimate = estimate_memory(shape, training)
    capacity = None if device_memory_gb is None else int(device_memory_gb * 2**30)
    fit = None if capacity is None else fits(estimate, device_memory_bytes=capacity)
    if as_json:
        out = {
            "model": asdict(shape),
            "setup": {**asdict(training), "bf16_autocast": training.autocast},
            "estimate": estimate.to_dict(),
            "device_memory_bytes": capacity,
            "fits": fit,
        }
        print(json.dumps(out))
        return
    where = "CPU RAM" if setup.device == "cpu" else setup.device
    stdout.print(
        f"{shape.name}: {shape.params:,} parameters; micro-batch {estimate.micro_batch} x {estimate.seq} tokens on "
        f"{setup.device}{', bf16 autocast' if training.autocast else ''}"
        f"{', activation checkpointing' if training.activation_checkpointing else ''}",
        highlight=False,
    )
    moment = {
        "forward": "the end of the forward pass",
        "backward": "the start of the backward pass",
        "optimizer step": "the optimizer step",
        "round end": "the end of a round (encoding its update)",
    }[estimate.phase]
    table = Table(caption=f"the peak is at {moment}; the last column is what is live then")
    for column in ("term", "size", f"at peak ({where})"):
        table.add_column(column, justify="left" if column == "term" else "right")
    labels = {"parameters": "parameters (fp32)", "optimizer": "AdamW state", "round_end": "round-end copies"}
    sizes, live = estimate.sizes.rows(), estimate.at_peak.rows()
    for term, nbytes in sizes.items():
        table.add_row(labels.get(term, term.replace("_", " ")), _gib(nbytes), _gib(live[term]))
    table.add_row("peak", "", _gib(estimate.device_bytes), style="bold")
    runtime = "CUDA context" if setup.device == "cuda" else "PyTorch's CPU kernels and libraries"
    table.add_row(f"+ {runtime}", "", _gib(estimate.runtime))
    stdout.print(table)
    if estimate.host_bytes:
        stdout.print(f"host RAM besides: {_gib(estimate.host_bytes)} (outer state and round-end copies)")
    if capacity is not None:
        verdict = "fits" if fit else "does NOT fit"
        stdout.print(f"{verdict} in {device_memory_gb:g} GB, keeping {HEADROOM:.0%} free", highlight=False)


def _gib(nbytes: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    if nbytes == 0:
        return "-"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
