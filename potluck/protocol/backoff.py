"""How long a node waits before it asks an unreachable aggregator again: exponential backoff with full jitter.

When an aggregator restarts, every peer loses it at the same moment. With a fixed or a merely doubling
wait they would all retry at the same instants, again and again; each wait is drawn uniformly between
zero and the doubling ceiling instead ("full jitter"), so the retries spread over the whole window.
"""

import random

_RNG = random.Random()  # seeded from the OS: each process draws waits of its own
_MAX_DOUBLINGS = 64  # far past any cap; keeps 2**attempt a float


def backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0: the first): uniform in [0, min(cap_s, base_s * 2**attempt)].

    `rng` makes the draws reproducible (tests); by default every process has its own random state.
    """
    if attempt < 0 or base_s < 0 or cap_s < 0:
        raise ValueError(f"backoff needs attempt, base_s and cap_s >= 0 (got {attempt}, {base_s}, {cap_s})")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt, _MAX_DOUBLINGS))
    return (rng or _RNG).uniform(0.0, ceiling)
