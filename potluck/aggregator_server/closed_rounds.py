"""The last few closed rounds, kept in memory for the peers that come back to them.

A peer asks for round r's aggregate when r closes, its final receipt once the aggregate has reached
it, and may retry an upload whose receipt was lost after r closed. Each closed round leaves one
`ClosedRound` record; the window keeps the last KEPT_ROUNDS of them and drops older ones in one
place, so nothing about an old round lingers in a dict that another prune forgot. A peer that asks
about an older round downloads the state again; its receipt is then read from the ledger.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from potluck.incentives.ledger_format import LedgerRow

KEPT_ROUNDS = 8  # rounds whose aggregate a late peer can still fetch


@dataclass(frozen=True, kw_only=True, slots=True)
class ClosedRound:
    """What a closed round leaves behind for peers that come back to it."""

    index: int
    aggregate: bytes  # the AGGREGATE frame body (signed header and payload)
    # update digest -> tokens credited: a retried upload whose first reply was lost gets its receipt again
    # instead of a "round closed" rejection (empty for a round restored from a checkpoint or followed)
    credited: Mapping[bytes, int] = field(default_factory=dict)
    nonces: dict[bytes, bytes] = field(default_factory=dict)  # nonce -> digest of its contributors' updates
    rows: tuple[LedgerRow, ...] | None = None  # its ledger rows, for final receipts (None: read the ledger)


class ClosedRounds:
    """The window of the last KEPT_ROUNDS closed rounds, by index."""

    def __init__(self, kept: int = KEPT_ROUNDS) -> None:
        self.kept = kept
        self._rounds: dict[int, ClosedRound] = {}

    def add(self, closed: ClosedRound) -> None:
        """Keep `closed`; forget the rounds that fall out of the window behind it."""
        self._rounds[closed.index] = closed
        for old in [r for r in self._rounds if r <= closed.index - self.kept]:
            del self._rounds[old]

    def get(self, index: int) -> ClosedRound | None:
        """Round `index`'s record, if it is still in the window."""
        return self._rounds.get(index)

    def aggregate(self, index: int) -> bytes | None:
        """Round `index`'s AGGREGATE frame body, if still held."""
        closed = self._rounds.get(index)
        return None if closed is None else closed.aggregate

    def credited(self, index: int, digest: bytes) -> int | None:
        """The tokens credited to update `digest` in round `index`; None if it is not a held contribution."""
        closed = self._rounds.get(index)
        return None if closed is None else closed.credited.get(digest)

    def nonces(self) -> dict[bytes, bytes]:
        """Nonce -> update digest over every held round's contributions (a nonce is spent once per run)."""
        return {n: d for closed in self._rounds.values() for n, d in closed.nonces.items()}

    def nonce_maps(self) -> list[dict[bytes, bytes]]:
        """Each held round's nonce -> digest map, newest first: `nonces` without copying them (one per upload)."""
        return [self._rounds[r].nonces for r in sorted(self._rounds, reverse=True)]

    def __contains__(self, index: object) -> bool:
        return index in self._rounds

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._rounds))
