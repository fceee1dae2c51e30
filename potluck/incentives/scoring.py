"""How much credit one update earns: the rule behind every point on the leaderboard.

Credit is never the raw claimed token count, which costs nothing to inflate. For one update:

1. A rejected update earns 0, whatever it claimed.
2. Its claim is capped at the most one peer can train in a round under the run's config
   (``token_cap``), at ``max_ratio`` x the round's median claim (a minority cannot move a median),
   and, once the peer has ``min_history`` accepted rounds behind it, at ``max_growth`` x the median of
   its own past credited claims (a peer's hardware does not grow tenfold overnight; honest growth is
   followed within a few rounds).
3. The capped tokens are weighted by the update's measured quality when the held-out-loss check ran:
   its held-out gain over the round's base relative to the round's median gain, clamped to
   ``[0, max_quality]`` (an update that helped twice as much as the median earns up to max_quality x;
   one that helped nothing earns nothing). Without a measurement the weight is 1.

Pure functions of plain numbers, so the aggregator, `potluck ledger verify` and anyone reading the
ledger reproduce a credit exactly.
"""

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class ScoringRule:
    """The rule's knobs (see the module docstring); the defaults are the run's."""

    max_ratio: float = 2.0  # x the round's median claim
    max_growth: float = 2.0  # x the peer's own median past claim
    min_history: int = 3  # accepted rounds before the peer's history caps its claim
    max_quality: float = 2.0  # most a quality weight can multiply the capped tokens by

    def __post_init__(self) -> None:
        for name in ("max_ratio", "max_growth", "max_quality"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 1):
                raise ValueError(f"{name} must be finite and at least 1, got {value}")
        if self.min_history < 1:
            raise ValueError(f"min_history must be at least 1, got {self.min_history}")


def capped_claim(
    claimed: int,
    *,
    round_claims: Sequence[int],
    history: Sequence[int],
    token_cap: int,
    rule: ScoringRule = ScoringRule(),
) -> int:
    """The claim after the config, round-median and own-history caps (step 2 of the module docstring).

    ``round_claims`` are the claims of the round's accepted updates (this one included); ``history``
    this peer's credited claims in earlier rounds. ValueError on a negative claim or a cap below 1.
    """
    if claimed < 0 or any(c < 0 for c in round_claims) or any(h < 0 for h in history):
        raise ValueError("token claims cannot be negative")
    if token_cap < 1:
        raise ValueError(f"token_cap must be at least 1, got {token_cap}")
    cap = float(token_cap)
    positive = [c for c in round_claims if c > 0]
    if positive:
        cap = min(cap, rule.max_ratio * statistics.median(positive))
    past = [h for h in history if h > 0]
    if len(past) >= rule.min_history:
        cap = min(cap, rule.max_growth * statistics.median(past))
    return int(min(claimed, math.floor(cap)))


def quality_weight(gain: float | None, *, median_gain: float | None, rule: ScoringRule = ScoringRule()) -> float:
    """The update's held-out gain relative to the round's median gain, in [0, max_quality]; 1 if unmeasured.

    Unmeasured means the held-out check did not run (off, or too few updates) or the round's median
    update gained nothing, which leaves no yardstick.
    """
    if gain is None or median_gain is None or not math.isfinite(median_gain) or median_gain <= 0:
        return 1.0
    if not math.isfinite(gain):
        return 0.0
    return min(rule.max_quality, max(0.0, gain / median_gain))


def credit(
    claimed: int,
    *,
    accepted: bool,
    round_claims: Sequence[int],
    history: Sequence[int],
    token_cap: int,
    gain: float | None = None,
    median_gain: float | None = None,
    rule: ScoringRule = ScoringRule(),
) -> float:
    """Points for one update: 0 if rejected, else its capped claim times its quality weight."""
    if not accepted:
        return 0.0
    tokens = capped_claim(claimed, round_claims=round_claims, history=history, token_cap=token_cap, rule=rule)
    return tokens * quality_weight(gain, median_gain=median_gain, rule=rule)
