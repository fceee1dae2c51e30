"""Back-of-the-envelope planning for a run: scaling efficiency of local SGD and link transfer times.

Pure arithmetic, no torch, so ``potluck plan`` answers instantly on any machine. Units are fixed and in
the names: bandwidths in **bits** per second (how links are sold), payloads in **bytes** (MB = 10^6 bytes),
compute in FLOP/s per device, batches in tokens.

Scaling efficiency (He et al., "Exploring Scaling Laws for Local SGD in LLM Training", arXiv 2409.13198):

    K = 1 / (1 + 2(m-1)·n·C_d / (3·B·s·W))

with m clusters of n devices of C_d FLOP/s each, global batch B tokens, s local steps between
synchronizations and inter-cluster bandwidth W in **bytes** per second. Derivation, for N parameters:

* compute per round: one step costs 6·N·B FLOPs (forward 2NB + backward 4NB) spread over m·n devices,
  so s steps take ``T_comp = 6·N·B·s / (m·n·C_d)`` seconds;
* communication per round: a ring all-reduce over the m clusters moves 2(m-1)/m times the payload
  through each cluster's link, and the payload is 2 bytes per parameter (bf16), so
  ``T_comm = 2(m-1)/m · 2N / W = 4N(m-1) / (m·W)`` seconds;
* ``K = T_comp / (T_comp + T_comm) = 1 / (1 + T_comm/T_comp)`` and
  ``T_comm/T_comp = 4N(m-1)/(m·W) · m·n·C_d/(6·N·B·s) = 2(m-1)·n·C_d / (3·B·s·W)``:
  N and the 1/m of the ring both cancel, which is why the closed form has neither.

Because the payload is counted in bytes, W must be bytes per second: the functions here take the
link's bits per second and divide by 8.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypedDict

__all__ = [
    "AutoPlan",
    "Plan",
    "auto_plan",
    "local_steps_for_efficiency",
    "make_plan",
    "parse_quantity",
    "scaling_efficiency",
    "transfer_seconds",
]

BITS_PER_BYTE = 8
_K_TOLERANCE = 1e-12  # relative; far below any efficiency that matters, far above float rounding (~1e-16)


def _communication_ratio(
    *, clusters: int, gpus_per_cluster: int, device_flops: float, bandwidth_bits_per_s: float, batch_tokens: float
) -> float:
    """``2(m-1)·n·C_d / (3·B·W)``: T_comm/T_comp for one local step (divide by s for s steps)."""
    if clusters < 1 or gpus_per_cluster < 1:
        raise ValueError(f"clusters and gpus_per_cluster must be >= 1 (got {clusters}, {gpus_per_cluster})")
    for name, value in (
        ("device_flops", device_flops),
        ("bandwidth_bits_per_s", bandwidth_bits_per_s),
        ("batch_tokens", batch_tokens),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number (got {value})")
    bandwidth_bytes_per_s = bandwidth_bits_per_s / BITS_PER_BYTE
    return 2 * (clusters - 1) * gpus_per_cluster * device_flops / (3 * batch_tokens * bandwidth_bytes_per_s)


def scaling_efficiency(
    *,
    clusters: int,
    gpus_per_cluster: int,
    device_flops: float,
    bandwidth_bits_per_s: float,
    batch_tokens: float,
    local_steps: int,
) -> float:
    """K in (0, 1]: the share of wall time spent computing when m clusters sync every `local_steps` steps.

    One cluster needs no inter-cluster traffic, so ``clusters=1`` gives exactly 1.
    """
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1 (got {local_steps})")
    ratio = _communication_ratio(
        clusters=clusters,
        gpus_per_cluster=gpus_per_cluster,
        device_flops=device_flops,
        bandwidth_bits_per_s=bandwidth_bits_per_s,
        batch_tokens=batch_tokens,
    )
    return 1.0 / (1.0 + ratio / local_steps)


def local_steps_for_efficiency(
    target_k: float,
    *,
    clusters: int,
    gpus_per_cluster: int,
    device_flops: float,
    bandwidth_bits_per_s: float,
    batch_tokens: float,
) -> int:
    """The smallest number of local steps s with ``scaling_efficiency(...) >= target_k`` (up to float noise).

    From ``1/(1 + a/s) >= t``: ``s >= a·t/(1-t)`` with a the per-step communication ratio; the ceiling
    is then checked against `scaling_efficiency` itself so float rounding cannot make it off by one.
    """
    if not 0 < target_k < 1:
        raise ValueError(f"target_k must be between 0 and 1, exclusive (got {target_k}); K reaches 1 only as s grows")
    link: _Link = {
        "clusters": clusters,
        "gpus_per_cluster": gpus_per_cluster,
        "device_flops": device_flops,
        "bandwidth_bits_per_s": bandwidth_bits_per_s,
        "batch_tokens": batch_tokens,
    }
    ratio = _communication_ratio(**link)
    # A K equal to the target up to float noise counts as reaching it: scenario 1 at s=18 is exactly 0.9 on
    # paper but 0.8999999999999999 in floats, and 18, not 19, is the honest answer.
    reached = target_k * (1 - _K_TOLERANCE)
    steps = max(1, math.ceil(ratio * target_k / (1 - target_k)))
    while steps > 1 and scaling_efficiency(**link, local_steps=steps - 1) >= reached:
        steps -= 1
    while scaling_efficiency(**link, local_steps=steps) < reached:
        steps += 1
    return steps


def transfer_seconds(num_bytes: float, bandwidth_bits_per_s: float) -> float:
    """Seconds to move `num_bytes` over a link of `bandwidth_bits_per_s` (no latency, no protocol overhead)."""
    if not (math.isfinite(bandwidth_bits_per_s) and bandwidth_bits_per_s > 0):
        raise ValueError(f"bandwidth_bits_per_s must be a positive finite number (got {bandwidth_bits_per_s})")
    if not (math.isfinite(num_bytes) and num_bytes >= 0):
        raise ValueError(f"num_bytes must be a non-negative finite number (got {num_bytes})")
    return num_bytes * BITS_PER_BYTE / bandwidth_bits_per_s


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What the given inputs determine; a field is None when its inputs were not given. Results only:
    inputs are not echoed, so an all-None plan means there was nothing to compute."""

    K: float | None = None  # scaling efficiency at the given local steps (the paper's symbol)
    local_steps_needed: int | None = None  # smallest s with K >= target_k
    compute_seconds_per_round: float | None = None  # T_comp = 6·N·B·s / (m·n·C_d); needs params
    allreduce_seconds_per_round: float | None = None  # T_comm = 4N(m-1) / (m·W), bf16 ring; needs params
    upload_seconds: float | None = None  # one update, peer -> aggregator
    download_seconds: float | None = None  # one aggregate, aggregator -> peer
    round_network_seconds: float | None = None  # upload then download: the critical path without overlap

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json`` output (None stays null)."""
        return asdict(self)


class _Link(TypedDict):
    """The arguments the scaling model shares between `scaling_efficiency` and `local_steps_for_efficiency`."""

    clusters: int
    gpus_per_cluster: int
    device_flops: float
    bandwidth_bits_per_s: float
    batch_tokens: float


def _whole(value: float | None, name: str) -> int | None:
    """Counts arrive as floats from ``parse_quantity`` ("2", "1k"); accept them only when whole."""
    if value is None:
        return None
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"{name} must be a whole number (got {value})")
    return int(value)


def make_plan(
    *,
    params: float | None = None,
    clusters: float | None = None,
    gpus_per_cluster: float | None = None,
    device_flops: float | None = None,
    bandwidth_bits_per_s: float | None = None,
    batch_tokens: float | None = None,
    local_steps: float | None = None,
    target_k: float | None = None,
    upload_bytes: float | None = None,
    up_bits_per_s: float | None = None,
    download_bytes: float | None = None,
    down_bits_per_s: float | None = None,
) -> Plan:
    """Compute everything the inputs allow (raises ValueError on an impossible input):

    * ``K``: clusters, device_flops, bandwidth_bits_per_s, batch_tokens and local_steps;
    * ``local_steps_needed``: the same without local_steps, plus target_k;
    * per-round compute and all-reduce seconds of the paper's model: additionally `params` (N);
    * upload / download / round network seconds: a payload in bytes with its direction's bits per second.

    `gpus_per_cluster` left out means 1: a volunteer is a "cluster" of one GPU. `bandwidth_bits_per_s` is
    the link the efficiency model synchronizes over; `up_bits_per_s` and `down_bits_per_s` are a volunteer's
    two directions, usually about 10x apart on home links.
    """
    m = _whole(clusters, "clusters")
    n = _whole(gpus_per_cluster, "gpus_per_cluster") or 1
    s = _whole(local_steps, "local_steps")
    link: _Link | None = None
    if m is not None and device_flops is not None and bandwidth_bits_per_s is not None and batch_tokens is not None:
        link = {
            "clusters": m,
            "gpus_per_cluster": n,
            "device_flops": device_flops,
            "bandwidth_bits_per_s": bandwidth_bits_per_s,
            "batch_tokens": batch_tokens,
        }
    k = scaling_efficiency(**link, local_steps=s) if link is not None and s is not None else None
    needed = local_steps_for_efficiency(target_k, **link) if link is not None and target_k is not None else None

    compute = allreduce = None
    if params is not None:
        if not (math.isfinite(params) and params > 0):
            raise ValueError(f"params must be a positive finite number (got {params})")
        if link is not None and s is not None:  # 6 FLOPs per parameter per token
            compute = 6 * params * link["batch_tokens"] * s / (link["clusters"] * n * link["device_flops"])
        if link is not None and link["clusters"] > 1:
            m = link["clusters"]
            payload_bytes = 2 * params  # bf16
            allreduce = 2 * (m - 1) / m * transfer_seconds(payload_bytes, link["bandwidth_bits_per_s"])
        elif link is not None:
            allreduce = 0.0  # one cluster has nobody to reduce with

    up = down = None
    if upload_bytes is not None and up_bits_per_s is not None:
        up = transfer_seconds(upload_bytes, up_bits_per_s)
    if download_bytes is not None and down_bits_per_s is not None:
        down = transfer_seconds(download_bytes, down_bits_per_s)
    return Plan(
        K=k,
        local_steps_needed=needed,
        compute_seconds_per_round=compute,
        allreduce_seconds_per_round=allreduce,
        upload_seconds=up,
        download_seconds=down,
        round_network_seconds=up + down if up is not None and down is not None else None,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoPlan:
    """What a machine's measured step time and link predict for a run (`potluck plan --auto`).

    Two views of the same round. `K` is He et al.'s formula: a dense bf16 ring all-reduce among `peers`
    over the upload link, the paper's setting. `K_potluck` is this run's: one round's compute against
    its upload and download through the run's codecs to an aggregator, without overlap (with overlap
    the network time hides behind the next round's steps and K_potluck approaches 1).
    """

    peers: int
    local_steps: int
    target_k: float
    step_s: float
    device_flops: float  # effective: 6·N·tokens per step / step_s
    up_bits_per_s: float
    down_bits_per_s: float
    upload_bytes: int
    download_bytes: int
    round_compute_s: float
    round_network_s: float
    K: float
    local_steps_for_k: int
    K_potluck: float
    local_steps_for_k_potluck: int
    # The densest upload (of those measured) whose round still keeps K_potluck >= target_k at the run's
    # local steps; None when the run's codec takes no density or none was measured.
    density_for_k: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json`` output."""
        return asdict(self)

    def line(self) -> str:
        """One line for a log or a terminal."""
        return (
            f"plan: step {self.step_s * 1000:.0f} ms ({self.device_flops / 1e12:.2g} TFLOP/s), "
            f"up {_mbit(self.up_bits_per_s)} / down {_mbit(self.down_bits_per_s)} Mbit/s; "
            f"a round of {self.local_steps} steps computes {self.round_compute_s:.3g} s and moves "
            f"{self.upload_bytes / 1e3:,.0f} kB up, {self.download_bytes / 1e3:,.0f} kB down in "
            f"{self.round_network_s:.3g} s: K {self.K_potluck:.2f} (K >= {self.target_k:g} from "
            f"{self.local_steps_for_k_potluck} steps); He et al.'s dense all-reduce among {self.peers} peers: "
            f"K {self.K:.2f} (K >= {self.target_k:g} from {self.local_steps_for_k} steps); "
            f"--overlap would train through the network's {1 - self.K_potluck:.0%} of a round"
            + (
                f"; this link affords density up to 1/{round(1 / self.density_for_k)} at K >= {self.target_k:g}"
                if self.density_for_k is not None
                else ""
            )
        )


def _mbit(bits_per_s: float) -> str:
    mbit = bits_per_s / 1e6
    return f"{mbit:,.0f}" if mbit >= 100 else f"{mbit:.3g}"


def auto_plan(
    *,
    step_s: float,
    tokens_per_step: int,
    params: int,
    peers: int,
    local_steps: int,
    upload_bytes: int,
    download_bytes: int,
    up_bits_per_s: float,
    down_bits_per_s: float,
    target_k: float = 0.9,
    density_options: Mapping[float, tuple[int, int]] | None = None,
) -> AutoPlan:
    """The efficiency a run's settings give on a measured machine and link, and the local steps for `target_k`.

    `density_options` maps upload densities to their (upload, download) bytes per round; the densest
    whose round keeps K_potluck >= `target_k` is reported, since a denser code learns more per round.
    """
    for name, value in (("step_s", step_s), ("up_bits_per_s", up_bits_per_s), ("down_bits_per_s", down_bits_per_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number (got {value})")
    device_flops = 6 * params * tokens_per_step / step_s
    link: _Link = {
        "clusters": peers,
        "gpus_per_cluster": 1,
        "device_flops": device_flops,
        "bandwidth_bits_per_s": up_bits_per_s,  # the slower direction of a home link bounds the ring
        "batch_tokens": peers * tokens_per_step,
    }
    network_s = transfer_seconds(upload_bytes, up_bits_per_s) + transfer_seconds(download_bytes, down_bits_per_s)
    compute_s = local_steps * step_s

    def round_k(up_bytes: float, down_bytes: float) -> float:
        network = transfer_seconds(up_bytes, up_bits_per_s) + transfer_seconds(down_bytes, down_bits_per_s)
        return compute_s / (compute_s + network)

    affordable = [d for d, sizes in (density_options or {}).items() if round_k(*sizes) >= target_k]
    # s·step / (s·step + network) >= t  <=>  s >= t·network / ((1 - t)·step)
    potluck_steps = max(1, math.ceil(target_k * network_s / ((1 - target_k) * step_s) * (1 - _K_TOLERANCE)))
    return AutoPlan(
        peers=peers,
        local_steps=local_steps,
        target_k=target_k,
        step_s=step_s,
        device_flops=device_flops,
        up_bits_per_s=up_bits_per_s,
        down_bits_per_s=down_bits_per_s,
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        round_compute_s=compute_s,
        round_network_s=network_s,
        K=scaling_efficiency(**link, local_steps=local_steps),
        local_steps_for_k=local_steps_for_efficiency(target_k, **link),
        K_potluck=compute_s / (compute_s + network_s),
        local_steps_for_k_potluck=potluck_steps,
        density_for_k=max(affordable) if affordable else None,
    )


# ------------------------------------------------------------------------------------------- quantities

_PREFIXES = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BIT_WORDS = {"bit", "bits", "b", "bps", "bit/s", "b/s"}
_BYTE_WORDS = {"B", "byte", "bytes"}
_QUANTITY = re.compile(
    r"\s*(?P<number>[+-]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)"
    r"\s*(?P<prefix>[kKMGTP]?)(?P<unit>bits?|bit/s|bps|b/s|b|bytes?|B)?\s*"
)


def parse_quantity(text: str, *, kind: Literal["bits", "bytes"] | None = None) -> float:
    """Read "1e9", "4M", "150T", "100Mbit", "2.8MB" as a float (SI: k/K=10^3, M=10^6, G=10^9, T=10^12, P=10^15).

    A trailing unit word is optional: "bit"/"bits"/"b"/"bps"/"bit/s" mean bits, "B"/"byte(s)" bytes. The
    unit never scales the number; pass `kind` to refuse the wrong one, so "10MB" cannot pass as a bandwidth
    in bits (which would be off by 8x).
    """
    match = _QUANTITY.fullmatch(text)
    try:
        if match is None:
            raise ValueError
        value = float(match["number"]) * _PREFIXES[match["prefix"]]  # float() still refuses e.g. "1__0"
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a quantity; write a number with an optional k/M/G/T suffix, "
            "e.g. 1e9, 150T, 100Mbit, 2.8MB"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    unit = match["unit"]
    if kind == "bits" and unit in _BYTE_WORDS:
        raise ValueError(f"{text!r} is in bytes but a rate in bits is needed; multiply by 8 (e.g. 10MB -> 80Mbit)")
    if kind == "bytes" and unit in _BIT_WORDS:
        raise ValueError(f"{text!r} is in bits but a size in bytes is needed; divide by 8 (e.g. 80Mbit -> 10MB)")
    return value
