"""Strikes and bans: a key whose updates keep failing the checks is refused for the rest of the run.

Only rejections that the key's holder must have caused count as strikes: the update verified under
that key (so a forger cannot get an honest peer banned by naming its key), and the failure is not one
an honest peer hits by being slow or misconfigured for a moment (late round, stale base, clock skew).
`ban_after` strikes within `window_rounds` rounds ban the key for the run; an operator can also ban or
lift a key by hand (`potluck bans`).

The record lives in `<state-dir>/bans.json`, written atomically (temp, fsync, rename), so bans survive
restarts. The aggregator re-reads the file when it changes on disk, so `potluck bans add/lift` takes
effect on a running aggregator too.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from potluck.errors import PotluckError
from potluck.protocol.identity import fingerprint, public_key_from_hex, public_key_to_hex

logger = logging.getLogger(__name__)

BANS_FILE = "bans.json"
_FORMAT = "potluck-bans/v1"
# The checks whose failure says something about the key's holder (see the module docstring).
STRIKE_CHECKS = frozenset(
    {"run", "replay", "duplicate", "size", "codec", "empty", "decode", "finite", "norm", "direction", "held-out"}
)


class BanFileError(PotluckError):
    """bans.json cannot be read or written (one line, with the fix)."""


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


@dataclass(kw_only=True)
class Reputation:
    """Strikes per key (by round) and bans, backed by `<state-dir>/bans.json`."""

    path: Path
    ban_after: int = 3
    window_rounds: int = 10
    bans: dict[bytes, Ban] = field(default_factory=dict)
    strikes: dict[bytes, list[int]] = field(default_factory=dict)  # key -> rounds of its strikes
    _mtime_ns: int | None = None

    @classmethod
    def open(cls, state_dir: Path, *, ban_after: int = 3, window_rounds: int = 10) -> "Reputation":
        """The record of `state_dir` (empty when there is none yet)."""
        reputation = cls(path=state_dir / BANS_FILE, ban_after=ban_after, window_rounds=window_rounds)
        reputation.reload()
        return reputation

    def reload(self) -> None:
        """Read bans.json again (an operator may have edited it with `potluck bans`)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self.bans, self.strikes, self._mtime_ns = {}, {}, None
            return
        if stat.st_size > 64 * 2**20:
            raise BanFileError(f"{self.path} is {stat.st_size} bytes, far larger than a ban list; check the file")
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT!r}")
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
            self.bans = {b.public_key: b for b in bans}
            self.strikes = {public_key_from_hex(k): [int(r) for r in v] for k, v in data["strikes"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BanFileError(f"{self.path} is not a readable ban list ({e}); fix it or move it away") from None
        self._mtime_ns = stat.st_mtime_ns

    def reload_if_changed(self) -> None:
        """Reload when the file on disk is not the one last read or written (cheap: one stat)."""
        try:
            mtime_ns: int | None = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime_ns = None
        if mtime_ns != self._mtime_ns:
            self.reload()

    def save(self) -> None:
        """Write bans.json atomically."""
        data = {
            "format": _FORMAT,
            "bans": {
                public_key_to_hex(b.public_key): {
                    "fingerprint": fingerprint(b.public_key),
                    "reason": b.reason,
                    "round": b.round,
                    "at_s": b.at_s,
                    "issuer": None if b.issuer is None else public_key_to_hex(b.issuer),
                }
                for b in sorted(self.bans.values(), key=lambda b: b.public_key)
            },
            "strikes": {public_key_to_hex(k): v for k, v in sorted(self.strikes.items()) if v},
        }
        tmp = self.path.with_name(f".{BANS_FILE}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            reason = e.strerror or str(e)
            raise BanFileError(f"cannot write {self.path}: {reason}; free disk space or fix permissions") from e
        self._mtime_ns = self.path.stat().st_mtime_ns

    def is_banned(self, public_key: bytes) -> bool:
        """Whether the key is banned for this run."""
        return public_key in self.bans

    def strike(self, public_key: bytes, *, round_index: int, check: str) -> Ban | None:
        """Count a rejection against the key if it is a strike; returns the new Ban when this one bans it."""
        if check not in STRIKE_CHECKS or public_key in self.bans:
            return None
        self.reload_if_changed()
        recent = [r for r in self.strikes.get(public_key, []) if r > round_index - self.window_rounds]
        recent.append(round_index)
        self.strikes[public_key] = recent
        ban = None
        if len(recent) >= self.ban_after:
            reason = f"{len(recent)} rejected updates within {self.window_rounds} rounds (last: {check})"
            ban = Ban(public_key=public_key, reason=reason, round=round_index, at_s=time.time())
            self.bans[public_key] = ban
            logger.warning("banned %s: %s", fingerprint(public_key), reason)
        self.save()
        return ban

    def ban(self, public_key: bytes, *, reason: str, issuer: bytes | None = None) -> Ban:
        """An operator's ban, or one learned from `issuer`, another aggregator of the run."""
        self.reload_if_changed()
        ban = Ban(public_key=public_key, reason=reason, round=-1, at_s=time.time(), issuer=issuer)
        self.bans[public_key] = ban
        self.save()
        return ban

    def lift(self, public_key: bytes) -> bool:
        """Lift a ban and forget the key's strikes; False when it was not banned."""
        self.reload_if_changed()
        was_banned = self.bans.pop(public_key, None) is not None
        self.strikes.pop(public_key, None)
        self.save()
        return was_banned
