"""Whose holder records a joiner believes: the run's members, as the aggregator's own signature names them.

A holder record (protocol/holder_records.py) is signed by its holder, but any key can sign one: a stranger
could list many silent "holders" and cost every joiner a wait on each. So a joiner takes chunks only from
holders whose updates counted in the round that made the state it downloads (the contributors of that
round's aggregate, signed by the aggregator the manifest comes from) and from the run's aggregators (a
standby holds the state too). Those peers applied that aggregate, so they hold exactly that version.
"""

import logging
from collections.abc import Collection
from dataclasses import dataclass

from potluck.protocol.client import AggregatorLink, LinkError
from potluck.protocol.envelope import EnvelopeError, StateHeader

logger = logging.getLogger(__name__)

MEMBERS_TIMEOUT_S = 20.0  # for the aggregate that names them; past it the aggregator alone gives the state


@dataclass(frozen=True, kw_only=True, slots=True)
class Members:
    """The keys a joiner believes holder records from, and the bytes it took to learn them."""

    keys: frozenset[bytes]
    contributors: int = 0  # how many the aggregate lists: the holders' records are spread by it (holder_records.py)
    bytes_down: int = 0


async def state_members(link: AggregatorLink, h: StateHeader, *, aggregators: Collection[bytes] = ()) -> Members:
    """The contributors of the round that made `h`'s state (its aggregate, checked under `h`'s aggregator's
    key) and `aggregators`; only `aggregators` when that aggregate cannot be had (round 0, or gone)."""
    keys = frozenset(aggregators) | {h.aggregator_public_key}
    if h.round == 0:
        return Members(keys=keys)
    try:
        signed, _, t = await link.fetch_aggregate(h.round - 1, timeout_s=MEMBERS_TIMEOUT_S)
        signed.verify({h.aggregator_public_key})
    except (LinkError, EnvelopeError) as e:
        logger.info("holder records not used: the aggregate of round %d is not to be had (%s)", h.round - 1, e)
        return Members(keys=keys)
    a = signed.header
    if (a.round, a.new_version, a.config_hash) != (h.round - 1, h.new_version, h.config_hash):
        logger.info("holder records not used: round %d's aggregate is not the one that made this state", a.round)
        return Members(keys=keys, bytes_down=len(t.body) + t.sent_bytes)
    return Members(
        keys=keys | {key for key, _ in a.contributors},
        contributors=len(a.contributors),
        bytes_down=len(t.body) + t.sent_bytes,
    )
