"""The combine rules: how a round's accepted updates become one, in one registry.

Pure functions over decoded updates (``name -> fp32 tensor``, same names and shapes in every update)
and float weights (token counts):

- `weighted_mean`: ``sum_i w_i u_i / sum_i w_i``. It lets one peer move the aggregate arbitrarily far:
  an update scaled by 1e6, or a claim of 100x the tokens, wins the round. The others bound that:
- `cap_weights`: a peer's weight is at most ``max_ratio_to_median`` times the median claim.
- `trimmed_mean`: per coordinate, drop the ``floor(trim_fraction * n)`` largest and smallest
  values and take the weighted mean of the rest (Yin et al. 2018, Flower's ``FedTrimmedAvg``).
- `centered_clip`: CenteredClip (Karimireddy, He, Jaggi, "Learning from History for Byzantine
  Robust Optimization", arXiv 2012.10333): a weighted mean in which each update's distance from
  the current estimate is clipped to ``tau``, over the whole update, iterated.

`RULES` names them as the run config does (``aggregation.kind``), each with how the config sets its
parameters; `combine` applies the configured one and `aggregate` one by name with given parameters.

An update with weight 0 takes no part anywhere: it neither counts towards ``n`` when trimming nor
towards the starting median of `centered_clip`.

Every function is deterministic: fixed orders, no randomness, sequential sums where the order
would otherwise be the library's choice (CenteredClip's norms are float64 reductions, reproducible
on one machine and torch build). Peers never recompute the aggregate anyway; they apply the signed,
decoded payload. Inputs are never modified; outputs are fresh fp32 tensors on the first update's device.
"""

import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from potluck.protocol.config import AggregationSpec

logger = logging.getLogger(__name__)

AggregatorKind = Literal["mean", "trimmed-mean", "centered-clip"]
AGGREGATOR_KINDS: tuple[str, ...] = get_args(AggregatorKind)
assert set(AGGREGATOR_KINDS) == set(get_args(AggregationSpec.model_fields["kind"].annotation))

# Elements per slice when a coordinate-wise statistic sorts n updates' values: the sort holds
# n * _CHUNK_ELEMENTS values (fp32) and indices (int64), ~300 MB for n = 100, whatever the tensor's size.
_CHUNK_ELEMENTS = 1 << 18

Updates = Sequence[Mapping[str, torch.Tensor]]


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i * u_i / sum_i w_i`` per tensor (fp32), in the order given; deterministic.

    Weights are finite, non-negative and not all zero (e.g. token counts, already capped by the
    caller); every update has the first one's names and shapes. ValueError otherwise.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update and at least one update, got {len(updates)} and {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)[:8]}")
    first = updates[0]
    for i, update in enumerate(updates):
        if list(update) != list(first) or any(update[k].shape != first[k].shape for k in first):
            raise ValueError(f"update {i} has different tensor names or shapes than update 0")
    total = math.fsum(weights)
    mean = {name: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for name, t in first.items()}
    for update, weight in zip(updates, weights, strict=True):
        if weight == 0:
            continue
        for name, acc in mean.items():
            acc.add_(update[name].to(torch.float32), alpha=weight / total)
    return mean


def cap_weights(
    tokens: Sequence[int], *, max_ratio_to_median: float | None = 2.0, hard_cap: int | None = None
) -> list[float]:
    """Token claims as weights, each capped at ``max_ratio_to_median`` x the median claim (and ``hard_cap``).

    ``max_ratio_to_median=None`` leaves out the median cap (with no hard cap either, claims are the
    weights: the red team's undefended baseline).

    Why the median: while honest peers are a strict majority of the positive claims, the median lies
    between the smallest and the largest honest claim whatever the others claim, so a minority
    cannot inflate the cap; a mean or a maximum would follow one liar. Zero claims are left out of the
    median (they carry no weight, so zero-token sybils cannot drag the cap down); with no positive
    claim every weight is 0. ``hard_cap`` is the most one peer can train in a round (`master.token_cap`).
    ValueError on no claims, a negative claim, a ratio below 1 or not finite, or a hard cap below 1.
    """
    if not tokens:
        raise ValueError("need at least one token claim to cap")
    if any(t < 0 for t in tokens):
        raise ValueError(f"token claims must be non-negative, got {list(tokens)[:8]}")
    if max_ratio_to_median is not None and not (math.isfinite(max_ratio_to_median) and max_ratio_to_median >= 1):
        raise ValueError(f"max_ratio_to_median must be finite and at least 1, got {max_ratio_to_median}")
    if hard_cap is not None and hard_cap < 1:
        raise ValueError(f"hard_cap must be at least 1 token (or None for no hard cap), got {hard_cap}")
    positive = [t for t in tokens if t > 0]
    if not positive:
        return [0.0] * len(tokens)
    cap = math.inf if max_ratio_to_median is None else max_ratio_to_median * statistics.median(positive)
    if hard_cap is not None:
        cap = min(cap, hard_cap)
    return [float(min(t, cap)) for t in tokens]


def trimmed_mean(updates: Updates, weights: Sequence[float], *, trim_fraction: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed weighted mean: drop the ``floor(trim_fraction * n)`` lowest and highest values.

    Rounding down: with ``trim_fraction`` in ``[0, 0.5)`` at least one value per coordinate is always
    kept, and trimming never removes more than asked (fewer than ``1 / trim_fraction`` updates trim nothing).
    Weights: values are trimmed by rank alone (the count an adversary controls is the count of its
    updates; its weight is already bounded by `cap_weights`), then the kept values are averaged with
    their own updates' weights, renormalised per coordinate. Ties in value are broken by weight, so
    the result does not depend on the order of the updates. With nothing to trim this is exactly
    `weighted_mean`. Memory: one slice of one tensor from all n updates at a time.
    """
    if not (0 <= trim_fraction < 0.5):
        raise ValueError(f"trim_fraction must be in [0, 0.5) (the share trimmed from each end), got {trim_fraction}")
    updates, weights = _live(updates, weights)
    n = len(updates)
    trim = math.floor(trim_fraction * n)
    if trim == 0:
        return weighted_mean(updates, weights)
    # Order updates by weight once (stable): the stable value sort below then breaks ties by weight.
    order = sorted(range(n), key=lambda i: weights[i])
    updates = [updates[i] for i in order]
    # Relative to the largest weight, in (0, 1]: the sums stay far from fp32's range limits.
    heaviest = max(weights)
    shares = torch.tensor([weights[i] / heaviest for i in order], dtype=torch.float32)
    result = {}
    for name, first in updates[0].items():
        device = first.device
        share = shares.to(device)
        flat = [u[name].reshape(-1) for u in updates]
        out = torch.empty(first.numel(), dtype=torch.float32, device=device)
        for start in range(0, first.numel(), _CHUNK_ELEMENTS):
            stop = min(start + _CHUNK_ELEMENTS, first.numel())
            values, ranks = torch.stack([f[start:stop] for f in flat]).to(torch.float32).sort(dim=0, stable=True)
            kept_weight = share[ranks[trim : n - trim]]
            acc = torch.zeros(stop - start, dtype=torch.float32, device=device)
            mass = torch.zeros(stop - start, dtype=torch.float32, device=device)
            for j in range(n - 2 * trim):  # a fixed, sequential order: bit-reproducible
                acc.addcmul_(values[trim + j], kept_weight[j])
                mass.add_(kept_weight[j])
            out[start:stop] = acc / mass
        result[name] = out.reshape(first.shape)
    return result


def centered_clip(
    updates: Updates,
    weights: Sequence[float],
    *,
    tau: float,
    iterations: int = 3,
    start: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """CenteredClip: ``v <- v + sum_i w_i (x_i - v) min(1, tau / ||x_i - v||) / sum_i w_i``, ``iterations`` times.

    ``||.||`` is the L2 norm over the whole update (all tensors together), so an update is moved as
    one vector, never distorted tensor by tensor; one peer then shifts ``v`` by at most
    ``tau * w_i / sum w`` per iteration. ``start`` is the first estimate: the paper uses the last
    round's aggregate (pass it); by default the coordinate-wise median of the updates (the lower
    median for an even count), which a minority cannot move, so few iterations suffice. Zeros would
    be the simplest start, but from zeros the honest updates themselves get clipped when ``tau`` is
    small. ``tau = inf`` is the weighted mean after one iteration, whatever the start.
    """
    if not (tau > 0):  # also refuses NaN
        raise ValueError(f"tau must be positive (the clipping radius, in the updates' L2 norm), got {tau}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    updates, weights = _live(updates, weights)
    if start is None:
        center = _coordinate_median(updates)
    else:
        _check_same_spec(updates[0], start, what="start")
        center = {name: start[name].to(t.device, torch.float32, copy=True) for name, t in updates[0].items()}
    total = math.fsum(weights)
    for _ in range(iterations):
        factors = []
        for update, weight in zip(updates, weights, strict=True):
            norm = math.sqrt(
                math.fsum((update[name].double() - v.double()).square().sum().item() for name, v in center.items())
            )
            factors.append(weight / total * (1.0 if norm <= tau else tau / norm))
        step = {name: torch.zeros_like(v) for name, v in center.items()}
        for update, factor in zip(updates, factors, strict=True):
            for name, acc in step.items():
                acc.add_(update[name].to(torch.float32) - center[name], alpha=factor)
        center = {name: v + step[name] for name, v in center.items()}
    return center


@dataclass(frozen=True, kw_only=True, slots=True)
class CombineRule:
    """One way to combine a round's updates, and how a run's config sets its parameters."""

    apply: Callable[..., dict[str, torch.Tensor]]  # (updates, weights, **params)
    params: Callable[[AggregationSpec, Updates], dict[str, Any]]  # its parameters under a run's config


def _clip_params(spec: AggregationSpec, updates: Updates) -> dict[str, Any]:
    """CenteredClip's radius scales with the round's median update norm (L2 over all tensors, in float64)."""
    norms = [math.sqrt(math.fsum(float(t.double().square().sum()) for t in u.values())) for u in updates]
    median_norm = statistics.median(norms)
    tau = spec.clip_tau_ratio * median_norm if median_norm > 0 else float("inf")
    return {"tau": tau, "iterations": spec.clip_iterations}


RULES: dict[str, CombineRule] = {
    "mean": CombineRule(apply=weighted_mean, params=lambda spec, updates: {}),
    "trimmed-mean": CombineRule(
        apply=trimmed_mean, params=lambda spec, updates: {"trim_fraction": spec.trim_fraction}
    ),
    "centered-clip": CombineRule(apply=centered_clip, params=_clip_params),
}
assert set(RULES) == set(AGGREGATOR_KINDS), "every aggregator kind the config allows has a rule"


def aggregate(
    kind: AggregatorKind, updates: Updates, weights: Sequence[float], **params: Any
) -> dict[str, torch.Tensor]:
    """The aggregate of ``updates`` by the named rule, with the rule's keyword arguments ``params``.

    (``trim_fraction``; ``tau``, ``iterations``, ``start``). ValueError on an unknown kind, naming the known ones.
    """
    rule = RULES.get(kind)
    if rule is None:
        raise ValueError(f"unknown aggregator {kind!r}; known: {', '.join(AGGREGATOR_KINDS)}")
    return rule.apply(updates, weights, **params)


def combine(updates: Updates, weights: Sequence[float], *, spec: AggregationSpec) -> dict[str, torch.Tensor]:
    """The run's combine rule (``aggregation.kind``) over the kept updates, with the parameters its config sets."""
    rule = RULES[spec.kind]
    return rule.apply(updates, weights, **rule.params(spec, updates))


def _live(updates: Updates, weights: Sequence[float]) -> tuple[list[Mapping[str, torch.Tensor]], list[float]]:
    """The updates with a positive weight, in the order given, after checking all of them."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update and at least one update, got {len(updates)} and {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)[:8]}")
    for i, update in enumerate(updates):
        _check_same_spec(updates[0], update, what=f"update {i}")
    kept = [(u, float(w)) for u, w in zip(updates, weights, strict=True) if w > 0]
    return [u for u, _ in kept], [w for _, w in kept]


def _check_same_spec(first: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *, what: str) -> None:
    """ValueError unless ``other`` has ``first``'s tensor names (in order) and shapes."""
    if list(other) != list(first) or any(other[k].shape != first[k].shape for k in first):
        raise ValueError(f"{what} has different tensor names or shapes than update 0")


def _coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per coordinate, the lower median of the updates' values (fp32), one slice of one tensor at a time."""
    middle = (len(updates) - 1) // 2
    result = {}
    for name, first in updates[0].items():
        flat = [u[name].reshape(-1) for u in updates]
        out = torch.empty(first.numel(), dtype=torch.float32, device=first.device)
        for start in range(0, first.numel(), _CHUNK_ELEMENTS):
            stop = min(start + _CHUNK_ELEMENTS, first.numel())
            out[start:stop] = torch.stack([f[start:stop] for f in flat]).to(torch.float32).sort(dim=0).values[middle]
        result[name] = out.reshape(first.shape)
    return result
