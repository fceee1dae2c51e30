"""The reports an aggregator's events carry beyond a line: a closed round's, and the ledger's leaderboard."""

import time

from potluck.aggregator_server.accounting import head_event
from potluck.aggregator_server.closing import RoundClose
from potluck.events import AcceptedUpdate, Credit, RoundClosed, Standing
from potluck.incentives.ledger import Ledger
from potluck.protocol.identity import fingerprint

LEADERBOARD_SIZE = 100  # peers listed in the ready event's leaderboard


def round_event(closed: RoundClose, *, val_loss: float | None, bytes_in: int, bytes_out: int) -> RoundClosed:
    """The event that reports a closed round: who counted, what it cost, and the state it produced."""
    closing, kept = closed.round, closed.kept
    return RoundClosed(
        round=closing.index,
        closed_by=closed.reason,
        val_loss=val_loss,
        accepted=tuple(
            AcceptedUpdate(
                fingerprint=fingerprint(key),
                tokens=a.update.header.tokens,
                bytes=len(a.payload),
                update=a.update.header.digest().hex()[:16],
                credit=kept[a.update.header.digest()].entry.credit,
            )
            for key, a in sorted(closing.accepted.items())
        ),
        rejected=closing.rejected,
        density=closed.density,  # the round's upload density, and the next one's
        next_density=closed.master.density,
        round_s=time.monotonic() - closing.opened_at,
        aggregation_s=closed.aggregation_s,
        aggregate_bytes=len(closed.record.aggregate),
        state_sha256=closed.signed.header.state_sha256.hex(),
        tokens=closing.tokens,
        time_s=time.time(),
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        ledger_head=head_event(closed.head),
        credits=tuple(
            Credit(
                fingerprint=fingerprint(r.entry.peer_public_key),
                public_key=r.entry.peer_public_key.hex(),
                credit=r.entry.credit,
            )
            for r in kept.values()
        ),
    )


def leaderboard(ledger: Ledger) -> tuple[Standing, ...]:
    """The ledger's top peers by points, for the ready event (the status page goes on from there)."""
    points, accepted = ledger.points(), ledger.accepted_counts()
    return tuple(
        Standing(fingerprint=fingerprint(key), public_key=key.hex(), points=total, accepted=accepted.get(key, 0))
        for key, total in list(points.items())[:LEADERBOARD_SIZE]
    )
