"""Confidence intervals for benchmark tables: a mean over seeds is reported with its 95% t-interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def t_half_width(values: Sequence[float]) -> float:
    """Half the width of the two-sided 95% t-interval of the mean of `values` (nan for fewer than two)."""
    n = len(values)
    if n < 2:
        return math.nan
    from scipy.stats import t  # hivemind's dependency; only a summary needs it

    return float(t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n))


def mean_interval(values: Sequence[float], spec: str) -> str:
    """`mean ± half-width` formatted with `spec` ("-" for no values, the mean alone for one)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(t_half_width(values), spec)}"
