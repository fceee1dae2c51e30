"""Strikes and bans: a key whose updates keep failing the checks is refused for the rest of the run.

Only rejections that the key's holder must have caused count as strikes: the update verified under
that key (so a forger cannot get an honest peer banned by naming its key), and the failure is not one
an honest peer hits by being slow or misconfigured for a moment (late round, stale base, clock skew).
`ban_after` strikes within `window_rounds` rounds ban the key for the run; an operator can also ban or
lift a key by hand (`potluck bans`). Whose failures are offered here at all is the keeper's call: only
a member's (a key with an accepted update in the run), so a flood of throwaway keys leaves no record.

The record lives in `<state-dir>/bans.sqlite` (ban_store.py): a strike appends a row, a ban upserts
one, written by a thread off the event loop; strikes older than the window are deleted as rounds
pass. The aggregator reloads when another process commits (`potluck bans add/lift`), so an operator's
hand takes effect on a running aggregator too. A state dir from before keeps its bans: `bans.json` is
imported once at open and renamed `bans.json.imported`.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from potluck.aggregator_server.ban_store import BanFileError, BanStore, Statement
from potluck.protocol.identity import fingerprint, public_key_from_hex

logger = logging.getLogger(__name__)

BANS_FILE = "bans.sqlite"
LEGACY_BANS_FILE = "bans.json"  # the whole-file record of earlier versions, imported once
_LEGACY_FORMAT = "potluck-bans/v1"
_MAX_LEGACY_BYTES = 256 * 2**20  # a flood could leave one of 68 MB; past this it is not a ban list
# The checks whose failure says something about the key's holder (see the module docstring).
STRIKE_CHECKS = frozenset(
    {"run", "replay", "duplicate", "size", "codec", "empty", "decode", "finite", "norm", "direction", "held-out"}
)
_UPSERT_BAN = "INSERT OR REPLACE INTO bans (public_key, reason, round, at_s, issuer) VALUES (?, ?, ?, ?, ?)"
_SELECT_BANS = "SELECT public_key, reason, round, at_s, issuer FROM bans ORDER BY public_key"
_IMPORT_BAN = _UPSERT_BAN.replace("OR REPLACE", "OR IGNORE")

__all__ = ["BANS_FILE", "LEGACY_BANS_FILE", "STRIKE_CHECKS", "Ban", "BanFileError", "Reputation"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Ban:
    """One banned key and why."""

    public_key: bytes
    reason: str
    round: int  # the round it was banned in (-1: by an operator, outside any round)
    at_s: float  # Unix time
    # The run's other aggregator this one learned the ban from (its public key); None: this aggregator's own.
    # Only its own bans are shared again, so a learned ban ends where it started.
    issuer: bytes | None = None


def _ban_row(ban: Ban) -> Statement:
    return _UPSERT_BAN, (ban.public_key, ban.reason, ban.round, ban.at_s, ban.issuer)


@dataclass(kw_only=True)
class Reputation:
    """Strikes per key (by round) and bans, held in memory and backed by `<state-dir>/bans.sqlite`."""

    store: BanStore
    ban_after: int = 3
    window_rounds: int = 10
    bans: dict[bytes, Ban] = field(default_factory=dict)
    strikes: dict[bytes, list[int]] = field(default_factory=dict)  # key -> rounds of its strikes
    _pruned_at: int = -1  # the round whose old strikes were last pruned

    @classmethod
    def open(cls, state_dir: Path, *, ban_after: int = 3, window_rounds: int = 10) -> "Reputation":
        """The record of `state_dir` (empty when there is none yet; a legacy bans.json is imported first)."""
        reputation = cls(store=BanStore(state_dir / BANS_FILE), ban_after=ban_after, window_rounds=window_rounds)
        reputation._import_legacy(state_dir / LEGACY_BANS_FILE)
        reputation.reload()
        return reputation

    @property
    def path(self) -> Path:
        """The ban store's file."""
        return self.store.path

    def reload(self) -> None:
        """Read the store again (an operator may have changed it with `potluck bans`)."""
        self.store.mark_loaded()  # first: a commit while reading is seen by the next `changed`
        try:
            bans = [
                Ban(public_key=bytes(k), reason=str(reason), round=int(r), at_s=float(at), issuer=issuer)
                for k, reason, r, at, issuer in self.store.query(_SELECT_BANS)
            ]
        except (TypeError, ValueError) as e:
            raise BanFileError(f"{self.path} holds a malformed ban ({e}); fix it or move it away") from None
        strikes: dict[bytes, list[int]] = {}
        for key, round_index in self.store.query("SELECT public_key, round FROM strikes ORDER BY id"):
            strikes.setdefault(bytes(key), []).append(int(round_index))
        self.bans = {b.public_key: b for b in bans}
        self.strikes = strikes

    def reload_if_changed(self) -> None:
        """Reload when another process committed to the store since the last load (cheap: one query)."""
        if self.store.changed():
            self.reload()

    def flush(self) -> None:
        """Wait until every strike and ban so far is on disk; BanFileError if a write failed."""
        self.store.flush()

    def close(self) -> None:
        """Write what is pending and close the store."""
        self.store.close()

    def is_banned(self, public_key: bytes) -> bool:
        """Whether the key is banned for this run."""
        return public_key in self.bans

    def strike(self, public_key: bytes, *, round_index: int, check: str) -> Ban | None:
        """Count a rejection against the key if it is a strike; returns the new Ban when this one bans it."""
        if check not in STRIKE_CHECKS or public_key in self.bans:
            return None
        self.reload_if_changed()
        self.prune(round_index)
        recent = [r for r in self.strikes.get(public_key, []) if r > round_index - self.window_rounds]
        recent.append(round_index)
        self.strikes[public_key] = recent
        writes: list[Statement] = [
            (
                "INSERT INTO strikes (public_key, round, check_name, at_s) VALUES (?, ?, ?, ?)",
                (public_key, round_index, check, time.time()),
            )
        ]
        ban = None
        if len(recent) >= self.ban_after:
            reason = f"{len(recent)} rejected updates within {self.window_rounds} rounds (last: {check})"
            ban = Ban(public_key=public_key, reason=reason, round=round_index, at_s=time.time())
            self.bans[public_key] = ban
            writes.append(_ban_row(ban))
            logger.warning("banned %s: %s", fingerprint(public_key), reason)
        self.store.write(writes)
        if ban is not None:
            self.store.flush()  # once per key and run: the ban is on disk before the receipt that says so
        return ban

    def prune(self, round_index: int) -> None:
        """Forget the strikes that no longer count at `round_index` (outside the window), in memory and on disk."""
        if round_index <= self._pruned_at:
            return
        self._pruned_at = round_index
        oldest = round_index - self.window_rounds  # a strike in this round or before no longer counts
        self.strikes = {
            k: recent for k, rounds in self.strikes.items() if (recent := [r for r in rounds if r > oldest])
        }
        self.store.write([("DELETE FROM strikes WHERE round <= ?", (oldest,))])

    def ban(self, public_key: bytes, *, reason: str, issuer: bytes | None = None) -> Ban:
        """An operator's ban, or one learned from `issuer`, another aggregator of the run."""
        self.reload_if_changed()
        ban = Ban(public_key=public_key, reason=reason, round=-1, at_s=time.time(), issuer=issuer)
        self.bans[public_key] = ban
        self.store.write([_ban_row(ban)])
        return ban

    def lift(self, public_key: bytes) -> bool:
        """Lift a ban and forget the key's strikes; False when it was not banned."""
        self.reload_if_changed()
        was_banned = self.bans.pop(public_key, None) is not None
        self.strikes.pop(public_key, None)
        self.store.write(
            [
                ("DELETE FROM bans WHERE public_key = ?", (public_key,)),
                ("DELETE FROM strikes WHERE public_key = ?", (public_key,)),
            ]
        )
        return was_banned

    def _import_legacy(self, legacy: Path) -> None:
        """Copy the bans of an earlier version's bans.json into the store, once, and set the file aside.

        Its strikes are left behind: they expire within a window anyway, and a flood's file is mostly
        throwaway keys' strikes.
        """
        try:
            size = legacy.stat().st_size
        except FileNotFoundError:
            return
        if size > _MAX_LEGACY_BYTES:
            raise BanFileError(f"{legacy} is {size} bytes, far larger than a ban list; check the file")
        try:
            data = json.loads(legacy.read_text())
            if data.get("format") != _LEGACY_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_LEGACY_FORMAT!r}")
            bans = [
                Ban(
                    public_key=public_key_from_hex(k),
                    reason=str(v["reason"]),
                    round=int(v["round"]),
                    at_s=float(v["at_s"]),
                    issuer=None if v.get("issuer") is None else public_key_from_hex(v["issuer"]),
                )
                for k, v in data["bans"].items()
            ]
            dropped = len(data.get("strikes", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BanFileError(f"{legacy} is not a readable ban list ({e}); fix it or move it away") from None
        # a ban already in the store (an earlier, interrupted import) stays as it is
        self.store.write([(_IMPORT_BAN, _ban_row(b)[1]) for b in bans])
        self.store.flush()
        try:
            legacy.rename(legacy.with_name(f"{LEGACY_BANS_FILE}.imported"))
        except OSError as e:
            raise BanFileError(f"cannot set {legacy} aside after importing it ({e}); move it away") from e
        logger.info("imported %d ban(s) from %s (%d keys' strikes left behind)", len(bans), legacy, dropped)
