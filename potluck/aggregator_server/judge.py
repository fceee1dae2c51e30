"""Judging a closed round: which accepted updates count, and with what weight.

Arrival checks (validation.py) see one update at a time; at round close the aggregator sees them
all. `judge_round` runs the round-level checks of round_checks.py with the run's thresholds and caps
the token weights of the updates that remain; the run's combine rule (training/combine.py) then
combines them. The run config decides everything (``validation`` and ``aggregation``), so every
replica of the decision is reproducible from the config and the updates.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from potluck.aggregator_server.round_checks import held_out_check, round_checks
from potluck.aggregator_server.validation import Rejection
from potluck.protocol.config import RunConfig
from potluck.training.combine import cap_weights

Update = Mapping[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """The round's decision: kept updates (by index) with their weights, and why the others were dropped."""

    kept: tuple[int, ...]
    weights: tuple[float, ...]  # capped token weights, aligned with `kept`
    rejections: dict[int, Rejection]  # index -> why it does not count
    # index -> held-out gain (base loss minus the loss with that update applied alone), where the check ran:
    # the scoring rule's quality measure
    gains: dict[int, float] = field(default_factory=dict)


def judge_round(
    updates: Sequence[Update],
    tokens: Sequence[int],
    *,
    cfg: RunConfig,
    token_cap: int,
    held_out_loss: Callable[[Update | None], float] | None = None,
) -> Verdict:
    """Drop the round's statistical outliers and cap the rest's weights (see the module docstring).

    ``held_out_loss(update)`` is the held-out loss of the round's base with that update applied alone
    (``None``: the base itself); the held-out check runs when the config enables it and this is given.
    """
    v = cfg.validation
    gains: dict[int, float] = {}
    verdicts = round_checks(
        updates,
        max_z=v.max_norm_z,
        min_ratio=v.min_norm_ratio,
        min_cosine=v.min_cosine,
        min_updates=v.min_updates,
    )
    if v.held_out_margin is not None and held_out_loss is not None:
        passed = [i for i, rejection in enumerate(verdicts) if rejection is None]
        if len(passed) >= v.min_updates:
            losses = [held_out_loss(updates[i]) for i in passed]
            base_loss = held_out_loss(None)
            checked = held_out_check(
                losses,
                base_loss=base_loss,
                margin=v.held_out_margin,
                noise_z=v.held_out_noise_z,
                min_updates=v.min_updates,
            )
            gains = {i: base_loss - loss for i, loss in zip(passed, losses, strict=True)}
            for i, rejection in zip(passed, checked, strict=True):
                verdicts[i] = rejection
    kept = tuple(i for i, rejection in enumerate(verdicts) if rejection is None)
    rejections = {i: rejection for i, rejection in enumerate(verdicts) if rejection is not None}
    weights: tuple[float, ...] = ()
    if kept:
        ratio = cfg.aggregation.max_weight_ratio
        # No ratio cap (the red team's undefended baseline) means no cap at all: claims are the weights.
        hard_cap = None if ratio is None else token_cap
        weights = tuple(cap_weights([tokens[i] for i in kept], max_ratio_to_median=ratio, hard_cap=hard_cap))
    return Verdict(kept=kept, weights=weights, rejections=rejections, gains=gains)
