"""The run's members, and how much of the rest the aggregator keeps: anyone can make a fresh key per upload.

A member is a key with an update accepted in this run: the ledger's accepted keys at start, then each
update accepted on arrival. Only a member's refusals leave a record (a ledger row, a strike, a remembered
answer), and every one is reported. A stranger's failing upload is refused with its reason code like any
other, but only the first MAX_STRANGER_REPORTS of a round are reported (log, events, status page); the
rest are counted, and the count is logged when the round closes.
"""

import logging
from collections.abc import Iterable

from potluck.aggregator_server.validation import Rejection

logger = logging.getLogger(__name__)

# Rejections decided before the signature is known good: the ledger cannot say whose upload it was.
UNATTRIBUTED = frozenset({"signature", "banned", "finished"})
MAX_STRANGER_REPORTS = 16  # strangers' refusals reported a round; the rest only counted


class Members:
    """The run's member keys, and the strangers' uploads refused in the open round."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self.keys: set[bytes] = set(keys)
        self.strangers_refused = 0  # non-members' uploads refused in the open round

    def add(self, public_key: bytes) -> None:
        """The key had an update accepted: a member from now on."""
        self.keys.add(public_key)

    def __contains__(self, public_key: object) -> bool:
        return public_key in self.keys

    def owns(self, public_key: bytes, rejection: Rejection | None = None) -> bool:
        """Whether the upload is a member's: its key is one, and `rejection` (given) came after its signature held.

        An upload refused before its signature is known good (UNATTRIBUTED) is nobody's: anyone can name a
        member's key on one.
        """
        attributed = rejection is None or rejection.check not in UNATTRIBUTED
        return attributed and public_key in self.keys

    def reports(self, public_key: bytes, rejection: Rejection) -> bool:
        """Whether this refusal is logged and reported: a member's always, a stranger's while the round has quota."""
        return self.owns(public_key, rejection) or self.strangers_refused < MAX_STRANGER_REPORTS

    def end_round(self, round_index: int) -> None:
        """Log how many strangers' uploads the closed round refused (the unreported included), and start over."""
        if self.strangers_refused > MAX_STRANGER_REPORTS:
            logger.warning(
                "round %d: refused %d uploads from keys with no accepted update in this run (%d reported)",
                round_index,
                self.strangers_refused,
                MAX_STRANGER_REPORTS,
            )
        self.strangers_refused = 0
