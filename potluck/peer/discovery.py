"""Which aggregator announcements a peer may use. Anyone can announce on an open DHT, so a stranger's never ends it.

An announcement of another protocol version, another run, or (once the run's config is known) from a key
that is not one of the run's aggregators is skipped, logged once. Only the run's own aggregators speaking
a newer protocol, with none of them left speaking this one, tell the peer to upgrade and end it.
"""

import logging
from collections.abc import Collection

from potluck.errors import PotluckError
from potluck.peer.options import PeerError
from potluck.protocol import PROTOCOL_VERSION, UPGRADE_HINT
from potluck.protocol.client import AggregatorUnreachable
from potluck.protocol.dht_schema import AggregatorAnnouncement
from potluck.protocol.identity import fingerprint, public_key_to_hex

logger = logging.getLogger(__name__)

MAX_SKIPS_LOGGED = 256  # distinct skipped announcements that get a log line; a flood of fresh keys gets no more
MAX_RUNS_LISTED = 5  # run names a message lists: strangers can announce any number of them


class SkipLog:
    """Logs each skipped announcement once (by key, protocol version and run), at most MAX_SKIPS_LOGGED of them."""

    def __init__(self) -> None:
        self._seen: set[tuple[bytes, int, str]] = set()

    def skip(self, announcement: AggregatorAnnouncement, why: str) -> None:
        """Note that `announcement` is not used, with the reason, unless it was noted before."""
        seen = (announcement.public_key, announcement.protocol_version, announcement.run_id)
        if seen in self._seen or len(self._seen) >= MAX_SKIPS_LOGGED:
            return
        self._seen.add(seen)
        logger.info("skipping the aggregator announcement of %s: %s", fingerprint(announcement.public_key), why)


def usable_announcements(
    found: list[AggregatorAnnouncement],
    *,
    run: str | None,
    run_keys: Collection[str] | None,
    joined: Collection[bytes],
    log: SkipLog,
) -> list[AggregatorAnnouncement]:
    """The announcements of `run` (any, when None) in this protocol version, from `run_keys` when known.

    `run_keys` are the run's aggregator keys as hex (its config's), None before the peer has the config;
    `joined` the libp2p peer ids named with --join, which pick the run when several are announced and no
    run was named. Raises PeerError only when the run's own aggregators speak a newer protocol and none
    speaks this one; AggregatorUnreachable, which the caller retries, when nothing usable is announced.
    """
    usable: list[AggregatorAnnouncement] = []
    skipped: list[AggregatorAnnouncement] = []
    for a in found:
        if run_keys is not None and public_key_to_hex(a.public_key) not in run_keys:
            why = "its key is not one of the run's aggregators"
        elif run is not None and a.run_id != run:
            why = f"it announces run {a.run_id!r}, not {run!r}"
        elif a.protocol_version != PROTOCOL_VERSION:
            why = f"it speaks protocol v{a.protocol_version}, this peer v{PROTOCOL_VERSION}"
        else:
            usable.append(a)
            continue
        skipped.append(a)
        log.skip(a, why)
    if run is None:
        usable = _one_run(usable, joined)
    if usable:
        return usable
    raise _none_usable(skipped, run=run, run_keys=run_keys)


def _one_run(usable: list[AggregatorAnnouncement], joined: Collection[bytes]) -> list[AggregatorAnnouncement]:
    """The announcements of the one run announced, or of the --join named aggregator's run when several are."""
    runs = sorted({a.run_id for a in usable})
    if len(runs) <= 1:
        return usable
    named = {a.run_id for a in usable if a.libp2p_peer_id in joined}
    if len(named) == 1:
        return [a for a in usable if a.run_id in named]
    listed = ", ".join(runs[:MAX_RUNS_LISTED]) + (", ..." if len(runs) > MAX_RUNS_LISTED else "")
    # retried, not fatal: anyone can announce a run, and the one the user wants may be among them
    raise AggregatorUnreachable(f"the DHT carries several runs ({listed}); choose one with --run NAME")


def _none_usable(
    skipped: list[AggregatorAnnouncement], *, run: str | None, run_keys: Collection[str] | None
) -> PotluckError:
    """Why no announcement is usable: the run's own aggregators moved to a newer protocol, or none is there yet."""
    own = [a for a in skipped if run_keys is not None and public_key_to_hex(a.public_key) in run_keys]
    newest = max((a for a in own if a.run_id == run), key=lambda a: a.protocol_version, default=None)
    if newest is not None and newest.protocol_version > PROTOCOL_VERSION:
        return PeerError(
            f"this peer runs potluck protocol v{PROTOCOL_VERSION}; the run's aggregator "
            f"{fingerprint(newest.public_key)} speaks v{newest.protocol_version}: {UPGRADE_HINT}"
        )
    of_run = "" if run is None else f" of run {run!r}"
    newer = [a for a in skipped if a.protocol_version > PROTOCOL_VERSION and (run is None or a.run_id == run)]
    hint = ""
    if newer and run_keys is None:  # keys this peer cannot check yet: a hint for a run that upgraded, no more
        hint = f" ({len(newer)} announcement(s) of a newer protocol skipped; if the run moved to it, {UPGRADE_HINT})"
    return AggregatorUnreachable(f"no aggregator announcement{of_run} on the DHT yet{hint}")
