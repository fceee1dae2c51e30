"""The run's top-k density, round by round: which densities a run allows and the codecs each one gives.

A fixed 1/64 top-k is right for a billion parameters on a 10 Mbit/s upload and far too thin for a small
model on the same link, where a round computes for seconds and sends a few kilobytes. With
``RunConfig.max_density`` set, the aggregator picks each round's upload density from a ladder
(the config's density, doubled, up to ``max_density``) and announces it, signed, in the previous
round's aggregate (``AggregateHeader.next_density``) and in the state it serves (``StateHeader.density``);
every peer of a round uploads at the same density, so the round's statistical checks compare like with
like. The aggregate's density keeps the config's ratio to the upload's (4x by default), at most 1.
Both sides compute the ladder the same way: multiplying by two is exact in floating point, so a density
is on it or not, with no tolerance.
"""

from potluck.protocol.codecs import Codec, make_codec
from potluck.protocol.config import RunConfig


def start_density(cfg: RunConfig) -> float:
    """Round 0's upload density: the config's, or 0.0 when the upload codec has no density (fp16, int8, none)."""
    return float(make_codec(cfg.codec.name, cfg.codec.params).params.get("density", 0.0))


def density_ladder(cfg: RunConfig) -> tuple[float, ...]:
    """The upload densities the run may use, thinnest first: only the config's when it does not adapt."""
    start = start_density(cfg)
    if start == 0.0 or cfg.max_density is None:
        return (start,)
    ladder = [start]
    while ladder[-1] * 2 <= cfg.max_density:
        ladder.append(ladder[-1] * 2)
    return tuple(ladder)


def density_problem(cfg: RunConfig, density: float) -> str | None:
    """Why `density` is not one this run allows (None when it is): for a density an aggregator announces."""
    ladder = density_ladder(cfg)
    if density in ladder:
        return None
    shown = ", ".join(f"{d:g}" for d in ladder)
    return f"density {density!r} is not one the run config allows ({shown})"


def aggregate_density(cfg: RunConfig, upload_density: float) -> float | None:
    """The aggregate's density for uploads at `upload_density`: the config's ratio between the two, at most 1.

    None when either codec takes no density (the aggregate codec's params then stay as configured).
    """
    start = start_density(cfg)
    down_density = make_codec(cfg.aggregate_codec.name, cfg.aggregate_codec.params).params.get("density")
    if not start or down_density is None:
        return None
    return min(1.0, float(down_density) * upload_density / start)


def round_codecs(cfg: RunConfig, density: float) -> tuple[Codec, Codec]:
    """(upload codec, aggregate codec) for a round at upload `density`; ValueError if the run does not allow it."""
    problem = density_problem(cfg, density)
    if problem is not None:
        raise ValueError(problem)
    upload = make_codec(cfg.codec.name, cfg.codec.params | ({"density": density} if start_density(cfg) else {}))
    down_density = aggregate_density(cfg, density)
    down_params = cfg.aggregate_codec.params | ({} if down_density is None else {"density": down_density})
    return upload, make_codec(cfg.aggregate_codec.name, down_params)
