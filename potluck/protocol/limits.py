"""Per-peer stream limits and I/O deadlines: a silent, slow or greedy remote uses up its own share, not everyone's.

Every stream handler takes a slot from a StreamLimits before it does any work: at most `total` streams of
that kind at once, and at most `per_owner` for any one owner (the libp2p peer id of the stream, and the
signing key where a verified one is known). A stream over either limit is answered "busy" (a BUSY
refusal, after the request's head was read, so the asker hears it) instead of waiting for a slot.

Every read and write on a stream has a deadline (wire.Deadlines): a short one for the frame header, one
for a body that grows with its declared size at a minimum rate, and a stall limit between pieces,
so a peer that stops sending, or stops reading what it asked for, gives its slot back within seconds.
"""

from collections import Counter
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from potluck.errors import PotluckError
from potluck.protocol.messages import BUSY_PREFIX
from potluck.protocol.wire import DEFAULT_DEADLINES, Deadlines

__all__ = ["DEFAULT_DEADLINES", "Busy", "Deadlines", "StreamLimits", "peer_of"]


class Busy(PotluckError):
    """No slot is free for this stream: the node, or this one remote, is at its limit (sent back as BUSY)."""


class StreamLimits:
    """Slots for one kind of stream: `total` at once, `per_owner` for any one owner (peer id or key).

    Taking a slot never waits: over a limit it raises Busy at once, so a flood is refused rather than
    queued. All bookkeeping happens between awaits, on the event loop's thread: no lock is needed.
    """

    def __init__(self, what: str, *, total: int, per_owner: int) -> None:
        if not 1 <= per_owner <= total:
            raise ValueError(f"{what}: need 1 <= per_owner <= total, got per_owner={per_owner}, total={total}")
        self.what = what
        self.total = total
        self.per_owner = per_owner
        self._held: Counter[Hashable] = Counter()  # owner -> slots held; owners at zero are dropped
        self.in_use = 0
        self.refused = 0  # streams answered "busy" so far (for logs and tests)

    def held_by(self, owner: Hashable) -> int:
        """How many slots `owner` holds now."""
        return self._held.get(owner, 0)

    @contextmanager
    def slot(self, *owners: Hashable | None) -> Iterator[None]:
        """Hold one slot for the `owners` of a stream (None: not known) while the block runs; Busy if none is free."""
        named = [o for o in dict.fromkeys(owners) if o is not None]
        if self.in_use >= self.total:
            self.refused += 1
            raise Busy(f"{BUSY_PREFIX}{self.total} {self.what} already in progress here; ask again in a few seconds")
        if any(self._held[o] >= self.per_owner for o in named):
            self.refused += 1
            raise Busy(f"{BUSY_PREFIX}you already have {self.per_owner} {self.what} in progress here; finish those")
        self.in_use += 1
        for o in named:
            self._held[o] += 1
        try:
            yield
        finally:
            self.in_use -= 1
            for o in named:
                self._held[o] -= 1
                if self._held[o] <= 0:
                    del self._held[o]


def peer_of(stream_info: object) -> bytes | None:
    """The remote libp2p peer id of a stream (hivemind's StreamInfo.peer_id), as bytes; None if it has none."""
    peer = getattr(stream_info, "peer_id", None)
    if peer is None:
        return None
    to_bytes = getattr(peer, "to_bytes", None)
    return to_bytes() if callable(to_bytes) else str(peer).encode()
