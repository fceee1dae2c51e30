"""Statistical checks that compare each update of a closed round with the others.

The per-update checks in ``validation`` can refuse a forged, stale or malformed update on arrival, but
not one that is well formed and merely wrong: scaled up to dominate the average, a near-empty update
from a free rider, or one pointing away from everyone else's. Those need the whole round, so they run
at round close over the decoded updates, and return one ``Rejection | None`` per update, in input order:

- ``norm_check``: an update's L2 norm far above the round's median (robust z-score on the median
  absolute deviation), or a tiny fraction of it;
- ``direction_check``: an update's cosine with the coordinate-wise median of the *other* updates;
- ``held_out_check`` (optional): the held-out loss of the round's base with this one update applied,
  against the same for the round's median update, beyond the round's own noise (the losses are computed
  by the caller).

Both use medians, not means, so that a minority of attackers cannot move the reference they are judged
against. Everything is a pure, deterministic function of plain tensors; inputs are never modified.
"""

import logging
import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from potluck.aggregator_server.validation import Rejection

logger = logging.getLogger(__name__)

# 1.4826 * MAD estimates the standard deviation of normally distributed values (1 / Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826
# The robust scale never goes below 1% of the median norm: when half the round or more has the same
# norm (MAD == 0) or nearly so, a z-score on the MAD alone would call an update 0.1% larger an
# outlier; with this floor and max_z=6 an update within 6% of the median is never "too large".
MIN_RELATIVE_SCALE = 0.01
# The direction check works on blocks of about this many values (n updates x BLOCK_ELEMENTS / n coordinates):
# a few float64 copies of a block stay near 100 MB however large the round or the model.
BLOCK_ELEMENTS = 1 << 22

Update = Mapping[str, torch.Tensor]


def _check_round(updates: Sequence[Update]) -> None:
    """Refuse an empty round and updates whose tensor names or shapes differ from the first's."""
    if not updates:
        raise ValueError("no updates to check; the round-close checks need at least one decoded update")
    first = updates[0]
    if not first:
        raise ValueError("update 0 has no tensors")
    shapes = {name: tuple(t.shape) for name, t in first.items()}
    for index, update in enumerate(updates):
        if set(update) != set(shapes):
            missing, extra = sorted(set(shapes) - set(update)), sorted(set(update) - set(shapes))
            raise ValueError(f"update {index} has other tensors than update 0: missing {missing}, extra {extra}")
        for name, tensor in update.items():
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(
                    f"update {index} tensor {name!r} has shape {tuple(tensor.shape)}, update 0 has {shapes[name]}"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"update {index} tensor {name!r} is {tensor.dtype}; decode updates to float32 first")


def _check_min_updates(min_updates: int) -> None:
    if min_updates < 3:
        raise ValueError(f"min_updates={min_updates}: a median needs at least 3 updates to mean anything")


def _check_min_cosine(min_cosine: float) -> None:
    if not (math.isfinite(min_cosine) and -1 <= min_cosine <= 1):
        raise ValueError(f"min_cosine={min_cosine} must be in [-1, 1], e.g. 0.0 (reject updates pointing away)")


def update_norms(updates: Sequence[Update]) -> list[float]:
    """The L2 norm of each whole update, over all its tensors, summed in float64."""
    _check_round(updates)
    return [math.sqrt(math.fsum(float(t.double().square().sum()) for t in update.values())) for update in updates]


def norm_check(
    norms: Sequence[float], *, max_z: float = 6.0, min_ratio: float = 0.05, min_updates: int = 4
) -> list[Rejection | None]:
    """Reject norms far above the round's median, or a tiny fraction of it; one result per norm.

    The z-score is robust: z_i = (norm_i - median) / scale with scale = 1.4826 * MAD (the median
    absolute deviation), floored at MIN_RELATIVE_SCALE * median so that a round where most norms are
    equal (MAD == 0) still tolerates small differences. Only large norms are judged by z (a large
    update dominates the average; a small one barely counts), and a norm below min_ratio * median is
    rejected as carrying almost nothing. With fewer than min_updates norms, or a median of 0 (no
    scale), nothing is rejected: two or three points are no statistics.
    """
    if not norms:
        raise ValueError("no norms to check; the round-close checks need at least one update")
    if not all(math.isfinite(n) and n >= 0 for n in norms):
        raise ValueError("norms must be finite and non-negative; check updates for NaN with decode_update first")
    if not (math.isfinite(max_z) and max_z > 0):
        raise ValueError(f"max_z={max_z} must be a positive number of robust deviations, e.g. 6.0")
    if not 0 <= min_ratio < 1:
        raise ValueError(f"min_ratio={min_ratio} must be in [0, 1), e.g. 0.05 (5% of the median norm)")
    _check_min_updates(min_updates)
    if len(norms) < min_updates:
        return [None] * len(norms)
    median = statistics.median(norms)
    if median == 0:
        return [None] * len(norms)
    mad = statistics.median(abs(n - median) for n in norms)
    scale = max(MAD_TO_SIGMA * mad, MIN_RELATIVE_SCALE * median)
    results: list[Rejection | None] = []
    for norm in norms:
        z = (norm - median) / scale
        if z > max_z:
            detail = f"norm {norm:.4g} is {z:.1f} robust deviations above the round's median {median:.4g}"
            results.append(Rejection(check="norm", detail=detail))
        elif norm < min_ratio * median:
            detail = f"norm {norm:.4g} is below {min_ratio:g} x the round's median {median:.4g}: it carries ~nothing"
            results.append(Rejection(check="norm", detail=detail))
        else:
            results.append(None)
    return results


def _leave_one_out_medians(columns: torch.Tensor) -> torch.Tensor:
    """Row i of the result: the coordinate-wise median of the rows of ``columns`` other than row i.

    ``columns`` is (numel, n): one update per column. Removing a value whose last position in the sorted
    column s is r leaves the column t with t[j] = s[j] if r > j else s[j + 1], and r > j exactly when
    s[j + 1] <= value. A leave-one-out median needs only the two or three middle order statistics of the
    whole column, which one partial sort (numpy's introselect, O(n) per coordinate) finds: exact, ties
    included, with no sort of the whole column and no fresh median over n - 1 values for every update.
    """
    n = columns.shape[1]
    others = n - 1
    lower = others // 2 if others % 2 == 1 else others // 2 - 1  # the first order statistic the median reads
    needed = list(range(lower, others // 2 + 2))
    picked = torch.from_numpy(np.partition(columns.numpy(), needed, axis=1)[:, needed].T.copy())
    rows = columns.T

    def order_statistic(j: int) -> torch.Tensor:
        return torch.where(rows >= picked[j + 1 - lower], picked[j - lower], picked[j + 1 - lower])

    if others % 2 == 1:
        return order_statistic(others // 2)
    # an even count of others: the mean of the two middle values, so no lower/upper convention leaks in
    return (order_statistic(others // 2 - 1) + order_statistic(others // 2)) / 2


def direction_check(
    updates: Sequence[Update], *, min_cosine: float = 0.0, min_updates: int = 4
) -> list[Rejection | None]:
    """Reject updates whose cosine with the median of the others is below min_cosine; one result per update.

    The reference for update i is the coordinate-wise median of the other n - 1 updates: a median, not a
    mean, because one attacker sending a huge update would drag a mean towards itself (and a mean that
    included i would let i vote for its own reference). Two identical attackers out of eight still face
    an honest median. The medians are exact and cost O(n) per coordinate (see _leave_one_out_medians),
    block by block of coordinates: memory beyond the inputs is a few blocks of about BLOCK_ELEMENTS values, never
    n copies of the model; dot products and squared norms accumulate in float64.

    An update of norm 0 has no direction and gets cosine 0 (whether it is too small is norm_check's
    question); when the others' median is 0 everywhere there is no reference direction and it passes.
    With fewer than min_updates updates nothing is rejected.
    """
    _check_round(updates)
    _check_min_cosine(min_cosine)
    _check_min_updates(min_updates)
    n = len(updates)
    if n < min_updates:
        return [None] * n
    dots = torch.zeros(n, dtype=torch.float64)
    norms_sq = torch.zeros(n, dtype=torch.float64)
    reference_sq = torch.zeros(n, dtype=torch.float64)
    step = max(1, BLOCK_ELEMENTS // n)
    for name in updates[0]:
        flat = [update[name].detach().reshape(-1).float() for update in updates]
        for start in range(0, flat[0].numel(), step):
            columns = torch.stack([f[start : start + step] for f in flat], dim=1)
            reference = _leave_one_out_medians(columns).double()
            rows = columns.T.double()
            dots += (rows * reference).sum(dim=1)
            norms_sq += rows.square().sum(dim=1)
            reference_sq += reference.square().sum(dim=1)
    results: list[Rejection | None] = []
    for dot, norm_sq, ref_sq in zip(dots.tolist(), norms_sq.tolist(), reference_sq.tolist(), strict=True):
        if ref_sq == 0:
            results.append(None)
            continue
        cosine = 0.0 if norm_sq == 0 else dot / math.sqrt(norm_sq * ref_sq)
        if cosine < min_cosine:
            detail = f"cosine {cosine:.3f} with the median of the other {n - 1} updates, below {min_cosine:g}"
            results.append(Rejection(check="direction", detail=detail))
        else:
            results.append(None)
    return results


def held_out_check(
    losses: Sequence[float], *, base_loss: float, margin: float = 1.0, noise_z: float = 0.0, min_updates: int = 4
) -> list[Rejection | None]:
    """Reject updates that, applied alone to the round's base, make the held-out loss clearly worse than most.

    ``losses[i]`` is the held-out loss of the base with update i applied; ``base_loss`` that of the base
    itself. The round's median update gains ``base_loss - median(losses)``; an update is rejected when
    its loss exceeds the median's by more than ``margin`` times that gain (margin 1: it does worse than
    not training at all). The yardstick is the round's own median gain, so the check tightens as the
    run converges and a minority cannot move it. Late in a run that gain is smaller than the noise of
    scoring on a few batches, so the allowance is never below ``noise_z`` robust standard deviations of
    the round's own losses (1.4826 x their MAD): the spread of single-update losses is the measurement
    noise, and a median-based spread is one a minority cannot inflate. ``noise_z`` 0: no floor. It judges
    nothing with fewer than min_updates losses or when the median update gains nothing (nothing to
    compare with); a non-finite loss is rejected.
    """
    _check_min_updates(min_updates)
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be finite and positive, got {margin}")
    if not (math.isfinite(noise_z) and noise_z >= 0):
        raise ValueError(f"noise_z must be finite and non-negative, got {noise_z}")
    if not math.isfinite(base_loss):
        raise ValueError(f"base_loss must be finite, got {base_loss}")
    results: list[Rejection | None] = [
        None if math.isfinite(loss) else Rejection(check="held-out", detail="its held-out loss is not finite")
        for loss in losses
    ]
    finite = [loss for loss in losses if math.isfinite(loss)]
    if len(finite) < min_updates:
        return results
    median = statistics.median(finite)
    gain = base_loss - median
    if gain <= 0:
        return results
    noise = MAD_TO_SIGMA * statistics.median(abs(loss - median) for loss in finite)
    limit = median + max(margin * gain, noise_z * noise)
    for i, loss in enumerate(losses):
        if results[i] is None and loss > limit:
            results[i] = Rejection(
                check="held-out",
                detail=(
                    f"held-out loss {loss:.4f} with it applied, above {limit:.4f} (round median {median:.4f}, "
                    f"base {base_loss:.4f}, margin {margin:g}, noise {noise:.4f} x {noise_z:g})"
                ),
            )
    return results


def round_checks(
    updates: Sequence[Update],
    *,
    max_z: float = 6.0,
    min_ratio: float = 0.05,
    min_cosine: float = 0.0,
    min_updates: int = 4,
) -> list[Rejection | None]:
    """Run the round-close checks in order, norm then direction; one result per update, in input order.

    Updates the norm check rejects are left out of the direction check altogether, also from the
    references of the others: a x100 update would otherwise still vote in every median. If fewer than
    min_updates survive the norm check, the direction check rejects nothing.
    """
    _check_min_cosine(min_cosine)
    norm_results = norm_check(update_norms(updates), max_z=max_z, min_ratio=min_ratio, min_updates=min_updates)
    kept = [i for i, rejection in enumerate(norm_results) if rejection is None]
    if not kept:  # only with extreme thresholds (max_z below 1); nothing left to compare
        return norm_results
    direction_results = direction_check([updates[i] for i in kept], min_cosine=min_cosine, min_updates=min_updates)
    results = list(norm_results)
    for i, rejection in zip(kept, direction_results, strict=True):
        results[i] = rejection
    rejected = sum(r is not None for r in results)
    if rejected:
        logger.debug("round checks rejected %d of %d updates", rejected, len(updates))
    return results
