"""Whom a round waits for: admission by work, not by asking.

A round closes early ("all-reported") once every key it expects has reported; every key it expects and
that never reports costs the round its whole deadline. So a round expects only keys that have done work:
an update of theirs was kept in one of the last RECENT_ROUNDS rounds (it passed every check, was signed by
the key, and counted in the aggregate). Asking for the state or the manifest, probing, or sending updates
that are refused (late, stale, for another round, failing a check) earns no place: such requests carry no
proof of work, and anyone can make them under as many keys as they like.

A key that is waited for and does not report is waited for MAX_MISSES times at most; then rounds stop
waiting for it until an update of it is kept again. One exception, for a member that is merely slow: an
update of it for the round before that comes late, while it has missed at most MAX_MISSES rounds, has the
open round wait for it once more (it is training this round now, from the aggregate it was late for).

A joiner is no member: a round does not wait for it, and it is accepted when its update comes in time. But
a joiner that syncs while a round is open is late for that round, and would start every later round behind
the members. So a key that is no member and sends a validly signed update for the round before, late, is a
newcomer, once per key: the open round, once its members have reported, waits for it no longer than the
members took. A stranger who does that under fresh keys can make rounds twice as long, never a deadline.
A key whose update came in time and decoded, but was dropped by the round's checks at close, is a newcomer
in the next round the same way (an honest update the checks drop by chance in the first round must not
leave its peer behind for good).

The first STARTUP_ROUNDS rounds of a run (and any round before some update was kept) also wait for those
that downloaded the state while they were open (the keeper's `join`): a swarm that starts together closes
its first round when everyone has reported, and a peer that started too slowly for the first round is
waited for in the second. That costs a run STARTUP_ROUNDS deadlines at most, whoever asks.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from potluck.incentives.ledger import Ledger

RECENT_ROUNDS = 2  # a key is a member while an update of it was kept in one of this many last rounds
MAX_MISSES = 1  # rounds a member is waited for in vain before the rounds stop waiting for it
STARTUP_ROUNDS = 2  # a run's first rounds, which wait for their joiners too
MAX_WELCOMED = 4096  # newcomer keys remembered (past it, the oldest half is forgotten)


@dataclass(kw_only=True, slots=True)
class Attendance:
    """Per key: the last round an update of it was kept in, and the rounds it has missed since."""

    kept: dict[bytes, int] = field(default_factory=dict)  # key -> last round an update of it was kept in
    misses: dict[bytes, int] = field(default_factory=dict)  # key -> rounds waited for in vain since then
    welcomed: dict[bytes, None] = field(default_factory=dict)  # newcomers waited for once already, oldest first

    @property
    def started(self) -> bool:
        """Whether the run has members: some update was kept (else a round waits for its joiners)."""
        return bool(self.kept)

    def waits_for_joiners(self, round_index: int) -> bool:
        """Whether round `round_index` waits for the keys that download the state while it is open."""
        return round_index < STARTUP_ROUNDS or not self.started

    def expected(self, round_index: int) -> set[bytes]:
        """The keys round `round_index` waits for: members that have not run out of misses."""
        return {k for k, kept in self.kept.items() if self._member(k, kept, round_index, MAX_MISSES)}

    def may_wait_late(self, public_key: bytes, round_index: int) -> bool:
        """Whether round `round_index` may wait for `public_key`, whose update for the round before came late."""
        kept = self.kept.get(public_key)
        return kept is not None and self._member(public_key, kept, round_index - 1, MAX_MISSES + 1)

    def welcome(self, public_key: bytes) -> bool:
        """Whether the open round may wait a little for `public_key`, a newcomer whose update came late: once."""
        if public_key in self.kept or public_key in self.welcomed:
            return False
        if len(self.welcomed) >= MAX_WELCOMED:
            for key in list(self.welcomed)[: MAX_WELCOMED // 2]:
                del self.welcomed[key]
        self.welcomed[public_key] = None
        return True

    def _member(self, public_key: bytes, kept: int, round_index: int, allowed_misses: int) -> bool:
        return kept >= round_index - RECENT_ROUNDS and self.misses.get(public_key, 0) < allowed_misses

    def round_closed(
        self, round_index: int, *, waited: Iterable[bytes], reported: Iterable[bytes], kept: Iterable[bytes]
    ) -> None:
        """Book a closed round: who it kept updates of, and who it waited for in vain (neither kept nor reported)."""
        kept, heard = set(kept), set(reported)
        for key in kept:
            self.kept[key] = round_index
            self.misses.pop(key, None)
        for key in set(waited) - kept - heard:
            if key in self.kept:
                self.misses[key] = self.misses.get(key, 0) + 1
        for key in [k for k, r in self.kept.items() if r < round_index - RECENT_ROUNDS]:  # no longer a member
            del self.kept[key]
            self.misses.pop(key, None)

    @classmethod
    def from_ledger(cls, ledger: Ledger, *, round_index: int) -> "Attendance":
        """The members of a run resumed at round `round_index`: those whose updates its last round kept."""
        attendance = cls()
        if round_index > 0:
            rows = ledger.rows(round_index=round_index - 1)
            attendance.seed(round_index - 1, (r.entry.peer_public_key for r in rows if r.entry.accepted))
        return attendance

    def seed(self, round_index: int, keys: Iterable[bytes]) -> None:
        """Members known from elsewhere (the ledger after a restart, the primary's last aggregate on a
        take-over): their updates were kept in round `round_index`."""
        for key in keys:
            self.kept[key] = max(self.kept.get(key, round_index), round_index)
