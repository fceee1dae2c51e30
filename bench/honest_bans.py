"""The chance that an honest key is banned in a long run, from its per-round rate of chance rejections.

An honest key's round-close rejections are modelled as independent, one per round with probability
`rate` (bench/honest_rejections.py measures the rate). Two policies, each simulated with Monte Carlo
over `--trials` runs of `--rounds` rounds, the same ban rule as reputation.py (`ban_after` strikes
within `window` rounds):

- "every rejection strikes" (before issue 22): each statistical rejection is a strike;
- "beyond noise" (strike_policy.py): the real NoiseFilter decides which rejection is a strike.

The union bound of strike_policy.py is printed beside them.

    python bench/honest_bans.py --rates 0.001,0.01,0.03,0.056,0.06 --rounds 1000 --trials 20000
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potluck.aggregator_server.strike_policy import NoiseFilter, strike_probability  # noqa: E402
from potluck.protocol.config import RunConfig  # noqa: E402

KEY = b"k" * 32


def banned(rejections: list[int], *, noise: NoiseFilter | None, ban_after: int, window: int) -> bool:
    """Whether a key rejected in these rounds is banned: reputation.py's window rule over the strikes."""
    strikes: list[int] = []
    for r in rejections:
        if noise is not None and not noise.strikes(KEY, round_index=r, check="held-out"):
            continue
        strikes = [s for s in strikes if s > r - window] + [r]
        if len(strikes) >= ban_after:
            return True
    return False


def main() -> None:
    """Simulate both policies at each rate; print one JSON object per rate."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.001,0.01,0.03,0.056,0.06")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    v = RunConfig().validation
    threshold = NoiseFilter.for_run(RunConfig()).threshold
    rng = random.Random(args.seed)
    for rate in (float(r) for r in args.rates.split(",")):
        old = new = 0
        for _ in range(args.trials):
            rejections = [r for r in range(args.rounds) if rng.random() < rate]
            old += banned(rejections, noise=None, ban_after=v.ban_after_rejections, window=v.ban_window_rounds)
            noise = NoiseFilter(window=v.ban_window_rounds, threshold=threshold)
            new += banned(rejections, noise=noise, ban_after=v.ban_after_rejections, window=v.ban_window_rounds)
        bound = strike_probability(rate, threshold=threshold, window=v.ban_window_rounds, rounds=args.rounds)
        row = {
            "rate": rate,
            "rounds": args.rounds,
            "trials": args.trials,
            "ban_every_rejection_strikes": old / args.trials,
            "ban_beyond_noise": new / args.trials,
            "strike_bound_beyond_noise": bound,
            "threshold": threshold,
            "window": v.ban_window_rounds,
            "ban_after": v.ban_after_rejections,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
