"""The open round: which updates it has, whom it still waits for, and when it closes.

A round closes at the first of: its deadline; the accepted updates carrying the run's target number
of tokens; every peer it expects having reported (an update signed by the peer, accepted or rejected:
a forger cannot report for someone else). Whom it expects is the keeper's to say (attendance.py: keys
that did work lately, never keys that only asked for something), so a peer that dies or stalls costs a
deadline at most, never a stall. A round with no update at its deadline stays open for another deadline:
there is nothing to aggregate.
"""

import time
from dataclasses import dataclass, field

import torch

from potluck.aggregator_server.validation import Rejection
from potluck.incentives.ledger_format import LedgerEntry
from potluck.protocol.envelope import SignedUpdate

MAX_REFUSED_PER_KEY = 4  # ledger rows a round keeps for one key's refused uploads
MAX_REFUSED_ROWS = 4096  # and for everyone's
MAX_JOINED = 4096  # joiners a round remembers (anyone can ask for the state under any key)


@dataclass(kw_only=True, slots=True)
class Accepted:
    """One accepted update, decoded, with the bytes that were spooled for it."""

    update: SignedUpdate
    envelope: bytes
    payload: bytes
    decoded: dict[str, torch.Tensor]
    weight: float  # tokens, capped (and discounted, for a late update)
    discount: float = 1.0  # below 1: a late update for the previous round (RunConfig.late_updates)
    upload_s: float = 0.0  # reading its upload (0.0: not timed, e.g. restored from the spool)
    cycle_s: float = 0.0  # from the round's opening to its arrival (next_density.py)

    @property
    def claim(self) -> int:
        """The tokens its header claims, at the late discount: what the round weighs and credits it by."""
        return int(self.update.header.tokens * self.discount)

    received_s: float = field(default_factory=time.time)  # Unix time it arrived (its ledger row's time)
    # its header's digest, computed once: every later upload of the round is checked against every accepted one's
    digest: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.digest = self.update.header.digest()


@dataclass(kw_only=True, slots=True)
class OpenRound:
    """Mutable state of the round being collected; owned by the server's event loop."""

    index: int
    deadline_s: float  # the round's length in seconds
    target_tokens: int | None
    expected: set[bytes] = field(default_factory=set)  # public keys the round waits for
    accepted: dict[bytes, Accepted] = field(default_factory=dict)  # by public key
    # keys that downloaded the state while this round was open (unauthenticated: counted for the first round's
    # wait_for_peers, waited for only before the run has members; bounded, see MAX_JOINED)
    joined: set[bytes] = field(default_factory=set)
    reported: set[bytes] = field(default_factory=set)  # keys whose (validly signed) update was judged, good or not
    # keys, not members, whose update for the round before came late or was dropped at its close (attendance.py):
    # once the members have reported, the round waits for them no longer than the members took
    newcomers: set[bytes] = field(default_factory=set)
    dropped: set[bytes] = field(default_factory=set)  # keys whose update was accepted, then dropped at close
    members_in_at: float | None = None  # time.monotonic() when every expected key had reported
    rejected: int = 0
    # ledger rows of updates refused on arrival, written when the round closes (bounded: see refuse())
    refused: list[LedgerEntry] = field(default_factory=list)
    # update digest -> the refusal its validly signed update got: the same update again (a retry after a lost
    # reply) gets the same answer, not a second strike (bounded: see remember_refusal())
    answered: dict[bytes, Rejection] = field(default_factory=dict)
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        """Tokens claimed by the accepted updates."""
        return sum(a.update.header.tokens for a in self.accepted.values())

    @property
    def arrived(self) -> set[bytes]:
        """The keys the round waits for or that downloaded its state (what the first round's wait_for_peers counts)."""
        return self.expected | self.joined

    def seconds_left(self, now: float | None = None) -> float:
        """Time until the deadline (negative when past it)."""
        return self.opened_at + self.deadline_s - (time.monotonic() if now is None else now)

    def close_reason(self, now: float | None = None) -> str | None:
        """Why the round should close now ("tokens", "all-reported", "deadline"), or None to keep waiting."""
        if not self.accepted:
            return None
        if self.target_tokens is not None and self.tokens >= self.target_tokens:
            return "tokens"
        now = time.monotonic() if now is None else now
        heard = self.accepted.keys() | self.reported
        if self.expected and self.expected <= heard:
            if self.members_in_at is None:
                self.members_in_at = now
            if self.newcomers <= heard or now - self.members_in_at >= self.members_in_at - self.opened_at:
                return "all-reported"
        if self.seconds_left(now) <= 0:
            return "deadline"
        return None

    def extend(self, now: float | None = None) -> None:
        """Give a round that got no update another full deadline."""
        self.opened_at = time.monotonic() if now is None else now

    def successor(self, *, expected: set[bytes]) -> "OpenRound":
        """The next round, waiting for `expected` (the keeper's attendance says whom)."""
        return OpenRound(
            index=self.index + 1, deadline_s=self.deadline_s, target_tokens=self.target_tokens, expected=expected
        )

    def refuse(self, entry: LedgerEntry) -> bool:
        """Keep the ledger row of an update refused on arrival; False (not kept) past the per-key or total bound.

        A peer that floods rejected uploads gets MAX_REFUSED_PER_KEY rows a round, not one per upload.
        """
        per_key = sum(e.peer_public_key == entry.peer_public_key for e in self.refused)
        if per_key >= MAX_REFUSED_PER_KEY or len(self.refused) >= MAX_REFUSED_ROWS:
            return False
        self.refused.append(entry)
        return True

    def remember_refusal(self, digest: bytes, rejection: Rejection) -> None:
        """Keep the refusal an update got, so a retry of it is answered the same; at most MAX_REFUSED_ROWS a round."""
        if len(self.answered) < MAX_REFUSED_ROWS:
            self.answered[digest] = rejection

    def join(self, public_key: bytes) -> None:
        """`public_key` downloaded the state while this round was open (kept up to MAX_JOINED keys)."""
        if len(self.joined) < MAX_JOINED:
            self.joined.add(public_key)
