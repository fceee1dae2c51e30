"""The next round's upload density, from how this round's uploads went (RunConfig.max_density).

The aggregator sees each on-time upload arrive: how many payload bytes, how long reading them took (the
peer's link, plus the stream's start-up), and how long after the round opened it came (the peer's
download, compute, encode and upload). A round's scaling efficiency is K = compute / (compute +
communication) (DESIGN.md, the scaling-law paper); with the upload taking a share (1 - K) / K of the
compute at most, each peer's link carries some densest step of the ladder, and the run takes the lower
median of those: the links of at least half the round's peers carry it, and peers on slower links are
time-boxed to fewer inner steps rather than holding the round up. Payload bytes are taken to grow in
proportion to the density; top-k's index bits per kept coefficient shrink as the density grows, so
that errs towards thinner codes. Downloads are left out: the links this is for download ~10x faster
than they upload, and the aggregate is measured against the deadline instead.
"""

from collections.abc import Sequence
from dataclasses import dataclass

TARGET_K = 0.9  # the scaling efficiency a round's uploads must keep
MIN_UPLOAD_S = 1e-3  # an upload read in one go gets a finite rate; the next, denser, one is then timed for real


@dataclass(frozen=True, slots=True)
class UploadTiming:
    """One on-time upload of the closing round, as the aggregator measured it."""

    payload_bytes: int
    upload_s: float  # reading its frame
    cycle_s: float  # from the round's opening to its arrival


def fitting_density(timing: UploadTiming, *, current: float, ladder: Sequence[float], target_k: float) -> float:
    """The densest step of `ladder` this peer's link would upload within the K budget (the thinnest if none)."""
    upload_s = max(timing.upload_s, MIN_UPLOAD_S)
    rate = timing.payload_bytes / upload_s
    compute_s = max(timing.cycle_s - upload_s, 0.0)
    budget_s = compute_s * (1 - target_k) / target_k
    fits = [d for d in ladder if timing.payload_bytes * d / current <= budget_s * rate]
    return max(fits, default=ladder[0])


def next_density(
    current: float, timings: Sequence[UploadTiming], *, ladder: Sequence[float], target_k: float = TARGET_K
) -> float:
    """The upload density for the round after this one: the lower median of what each peer's link carries.

    Unchanged when the run does not adapt (a one-step ladder), the codec has no density (0.0), or no
    upload was timed.
    """
    if len(ladder) < 2 or current <= 0 or not timings:
        return current
    picks = sorted(fitting_density(t, current=current, ladder=ladder, target_k=target_k) for t in timings)
    return picks[(len(picks) - 1) // 2]
