"""The aggregator's run as the status page shows it: a fold over the aggregator's events.

The aggregator emits plain event dicts (the same ones `--json` prints); `RunStatus.handle` folds
each into a small state and the snapshot methods hand out JSON-able copies. Everything kept is
bounded, because peers' activity (new keys, rejections with their reasons) drives how much arrives.
"""

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from potluck.web.fields import flag, fold_event, integer, number, records, text, texts

MAX_LOSS_POINTS = 1000  # one held-out loss per closed round, enough for the chart of a long run
MAX_ROUNDS = 1000  # closed-round summaries kept for /api/rounds
MAX_REJECTIONS = 200
MAX_PEERS = 10_000  # a flood of fresh keys evicts the longest-unseen peers first
MAX_STANDINGS = 10_000  # leaderboard entries; the lowest points go first
MAX_CHECKS = 64  # distinct rejection check names counted apart; the rest count as "other"
MAX_ROUND_ENTRIES = 10_000  # items read from one round's accepted and credits lists
MAX_MADDRS = 16
RECENT_ROUNDS = 10  # the window of the recent tokens/s average
ACTIVE_ROUNDS = 2  # a peer is active if it uploaded for the open round or one of the two before

Phase = Literal["starting", "collecting", "finished"]


@dataclass(slots=True)
class _Peer:
    """What the page knows about one peer; mutated in place under RunStatus's lock."""

    last_seen_s: float  # unix time of its latest upload, acceptance or rejection
    last_round: int = -1  # the latest round it uploaded for
    rounds_contributed: int = 0  # rounds it uploaded for
    uploads: int = 0
    accepted: int = 0  # updates that made it into an aggregate
    rejected: int = 0  # at arrival or at round close
    bytes_received: int = 0
    tokens_per_s: float | None = None  # its last accepted update's tokens over that round's length
    last_rejection: dict[str, Any] | None = None
    banned: bool = False
    ban_reason: str | None = None

    def saw_round(self, round_index: int) -> None:
        """Count `round_index` once among the rounds this peer took part in."""
        if round_index > self.last_round:
            self.last_round = round_index
            self.rounds_contributed += 1


@dataclass(slots=True)
class _Standing:
    """One leaderboard line: the ledger's points, seeded at start and grown by each round's credits."""

    public_key: str | None
    points: float = 0.0
    accepted: int = 0


class RunStatus:
    """The aggregator's status: `handle` every event, read snapshots from any thread."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        """`clock` gives unix seconds; tests inject one to check the deadline countdown."""
        self._clock = clock
        self._lock = threading.Lock()
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "ready": self._on_ready,
            "round-open": self._on_round_open,
            "received": self._on_received,
            "joined": self._on_joined,
            "rejected": self._on_rejected,
            "banned": self._on_banned,
            "unbanned": self._on_unbanned,
            "round": self._on_round,
            "error": self._on_error,
            "done": self._on_done,
        }
        self._run: dict[str, Any] = {}  # the ready event's description of the run
        self._client_modes: OrderedDict[str, str] = OrderedDict()  # fingerprint -> as it said when it joined
        self._maddrs: list[str] = []
        self._phase: Phase = "starting"
        self._round: int | None = None  # the round being collected
        self._round_deadline_s: float | None = None  # the open round's length
        self._deadline_at_s: float | None = None  # unix time the open round closes at the latest
        self._rounds_closed = 0
        self._loss: deque[dict[str, Any]] = deque(maxlen=MAX_LOSS_POINTS)
        self._rounds: deque[dict[str, Any]] = deque(maxlen=MAX_ROUNDS)
        self._throughput: deque[tuple[int, float]] = deque(maxlen=RECENT_ROUNDS)  # (tokens, round_s)
        self._bytes_in = 0
        self._bytes_out = 0
        self._accepted_total = 0
        self._rejected_by_check: dict[str, int] = {}
        self._peers: OrderedDict[str, _Peer] = OrderedDict()  # least recently seen first
        self._standings: dict[str, _Standing] = {}
        self._ledger_head: dict[str, Any] | None = None
        self._rejections: deque[dict[str, Any]] = deque(maxlen=MAX_REJECTIONS)
        self._last_error: dict[str, Any] | None = None

    # ----------------------------------------------------------------- input

    def handle(self, event: Mapping[str, Any]) -> None:
        """Fold one aggregator event in; unknown kinds are ignored and a malformed event never raises."""
        fold_event(event, self._handlers, self._lock, what="status page")

    def _on_ready(self, e: Mapping[str, Any]) -> None:
        self._run = {
            "run": text(e, "run"),
            "config_hash": text(e, "config_hash"),
            "fingerprint": text(e, "fingerprint"),
            "model": text(e, "model"),
            "num_params": integer(e, "num_params"),
            "codec": text(e, "codec"),
            "aggregate_codec": text(e, "aggregate_codec"),
            "rounds_total": integer(e, "rounds_total"),
            "round_deadline_s": number(e, "round_deadline_s"),
            "resumed": flag(e, "resumed"),
            "state_sha256": text(e, "state_sha256"),
        }
        self._maddrs = texts(e, "maddrs", max_items=MAX_MADDRS)
        self._round = integer(e, "round", default=0)
        self._phase = "collecting"
        val_loss = number(e, "val_loss")
        if val_loss is not None and not self._loss:
            # The state the run starts from: round -1 for a fresh run, the last closed round on resume.
            self._loss.append({"round": self._round - 1, "val_loss": val_loss})
        self._set_ledger_head(e.get("ledger_head"))
        self._standings = {}
        for item in records(e, "leaderboard", max_items=MAX_STANDINGS):
            who = text(item, "fingerprint")
            if who is not None:
                self._standings[who] = _Standing(
                    public_key=text(item, "public_key"),
                    points=number(item, "points", default=0.0),
                    accepted=integer(item, "accepted", default=0),
                )

    def _on_round_open(self, e: Mapping[str, Any]) -> None:
        self._round = integer(e, "round", default=self._round)
        self._round_deadline_s = number(e, "deadline_s")
        opened_at_s = number(e, "time_s", default=self._clock())
        self._deadline_at_s = None if self._round_deadline_s is None else opened_at_s + self._round_deadline_s
        if self._phase != "finished":
            self._phase = "collecting"

    def _on_received(self, e: Mapping[str, Any]) -> None:
        peer = self._peer(text(e, "fingerprint"), seen_s=number(e, "time_s"))
        if peer is None:
            return
        peer.uploads += 1
        peer.bytes_received += max(0, integer(e, "bytes", default=0))
        round_index = integer(e, "round")
        if round_index is not None:
            peer.saw_round(round_index)

    def _on_joined(self, e: Mapping[str, Any]) -> None:
        # A state download names a key without proving it: keep the mode aside (bounded), not as a peer.
        who, mode = text(e, "fingerprint"), e.get("client_mode")
        if who is None or type(mode) is not bool:
            return
        self._client_modes[who] = "client" if mode else "listening"  # dials out only, or accepts connections
        self._client_modes.move_to_end(who)
        if len(self._client_modes) > MAX_PEERS:
            self._client_modes.popitem(last=False)

    def _on_rejected(self, e: Mapping[str, Any]) -> None:
        check = text(e, "check", default="unknown", max_chars=64)
        rejection = {
            "round": integer(e, "round"),
            "fingerprint": text(e, "fingerprint"),
            "check": check,
            "reason": text(e, "reason", default=""),
            "update": text(e, "update", max_chars=64),
            "time_s": self._clock(),
        }
        self._rejections.append(rejection)
        if check not in self._rejected_by_check and len(self._rejected_by_check) >= MAX_CHECKS:
            check = "other"
        self._rejected_by_check[check] = self._rejected_by_check.get(check, 0) + 1
        peer = self._peer(rejection["fingerprint"])
        if peer is not None:
            peer.rejected += 1
            peer.last_rejection = {k: rejection[k] for k in ("round", "check", "reason")}

    def _on_banned(self, e: Mapping[str, Any]) -> None:
        peer = self._peer(text(e, "fingerprint"))
        if peer is not None:
            peer.banned = True
            peer.ban_reason = text(e, "reason")

    def _on_unbanned(self, e: Mapping[str, Any]) -> None:
        peer = self._peers.get(text(e, "fingerprint") or "")
        if peer is not None:
            peer.banned = False
            peer.ban_reason = None

    def _on_round(self, e: Mapping[str, Any]) -> None:
        closed = integer(e, "round", default=self._round if self._round is not None else 0)
        closed_at_s = number(e, "time_s", default=self._clock())
        round_s = number(e, "round_s")
        if round_s is not None and round_s <= 0:
            round_s = None  # a zero-length round has no rate
        tokens = max(0, integer(e, "tokens", default=0))
        val_loss = number(e, "val_loss")
        accepted = records(e, "accepted", max_items=MAX_ROUND_ENTRIES)
        tokens_per_s = tokens / round_s if round_s is not None else None
        self._rounds_closed += 1
        self._round = closed + 1
        self._round_deadline_s = self._deadline_at_s = None
        rounds_total = self._run.get("rounds_total")
        if rounds_total is not None and self._round >= rounds_total:
            self._phase = "finished"
        if val_loss is not None:
            self._loss.append({"round": closed, "val_loss": val_loss})
        if round_s is not None:
            self._throughput.append((tokens, round_s))
        self._bytes_in = integer(e, "bytes_in", default=self._bytes_in)
        self._bytes_out = integer(e, "bytes_out", default=self._bytes_out)
        self._set_ledger_head(e.get("ledger_head"))
        self._accepted_total += len(accepted)
        for item in accepted:
            peer = self._peer(text(item, "fingerprint"), seen_s=closed_at_s)
            if peer is None:
                continue
            peer.accepted += 1
            peer.saw_round(closed)
            if round_s is not None:
                peer.tokens_per_s = max(0, integer(item, "tokens", default=0)) / round_s
        # The round's credits are what the ledger booked; older aggregators put them on the accepted entries.
        credits = records(e, "credits", max_items=MAX_ROUND_ENTRIES) if "credits" in e else accepted
        for item in credits:
            self._credit(item)
        self._rounds.append(
            {
                "round": closed,
                "closed_by": text(e, "closed_by", max_chars=32),
                "val_loss": val_loss,
                "accepted": len(accepted),
                "rejected": max(0, integer(e, "rejected", default=0)),
                "tokens": tokens,
                "tokens_per_s": tokens_per_s,
                "round_s": round_s,
                "aggregation_s": number(e, "aggregation_s"),
                "aggregate_bytes": integer(e, "aggregate_bytes"),
                "state_sha256": text(e, "state_sha256"),
                "time_s": closed_at_s,
            }
        )

    def _on_error(self, e: Mapping[str, Any]) -> None:
        self._last_error = {
            "round": integer(e, "round"),
            "detail": text(e, "detail", default=""),
            "time_s": self._clock(),
        }

    def _on_done(self, e: Mapping[str, Any]) -> None:
        self._phase = "finished"
        self._round_deadline_s = self._deadline_at_s = None

    def _peer(self, who: str | None, *, seen_s: float | None = None) -> _Peer | None:
        """The peer's record, created if new (evicting the longest-unseen one past MAX_PEERS)."""
        if who is None:
            return None
        now_s = self._clock() if seen_s is None else seen_s
        peer = self._peers.get(who)
        if peer is None:
            peer = self._peers[who] = _Peer(last_seen_s=now_s)
            if len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
        else:
            peer.last_seen_s = max(peer.last_seen_s, now_s)
            self._peers.move_to_end(who)
        return peer

    def _credit(self, item: Mapping[str, Any]) -> None:
        who = text(item, "fingerprint")
        credit = number(item, "credit")
        if who is None or credit is None:
            return
        standing = self._standings.get(who)
        if standing is None:
            standing = self._standings[who] = _Standing(public_key=text(item, "public_key"))
            if len(self._standings) > MAX_STANDINGS:
                lowest = min(self._standings, key=lambda k: self._standings[k].points)
                del self._standings[lowest]
        standing.points += credit
        standing.accepted += 1

    def _set_ledger_head(self, head: object) -> None:
        if isinstance(head, Mapping):
            # Passed through as the ledger signed it; only its size is bounded.
            self._ledger_head = {
                str(k)[:64]: v[:1024] if isinstance(v, str) else v for k, v in list(head.items())[:32]
            }

    # ----------------------------------------------------------------- snapshots

    def status(self) -> dict[str, Any]:
        """The run at a glance: identity, round and countdown, loss curve, throughput, traffic and peers."""
        with self._lock:
            now_s = self._clock()
            seconds_to_deadline = None
            if self._phase == "collecting" and self._deadline_at_s is not None:
                seconds_to_deadline = max(0.0, self._deadline_at_s - now_s)
            last_tokens_per_s = recent_tokens_per_s = None
            if self._throughput:
                tokens, round_s = self._throughput[-1]
                last_tokens_per_s = tokens / round_s
                recent_tokens_per_s = sum(t for t, _ in self._throughput) / sum(s for _, s in self._throughput)
            last_round = self._rounds[-1] if self._rounds else None
            round_deadline_s = self._round_deadline_s
            if round_deadline_s is None:
                round_deadline_s = self._run.get("round_deadline_s")  # the configured length, between rounds
            return {
                "run": self._run.get("run"),
                "config_hash": self._run.get("config_hash"),
                "fingerprint": self._run.get("fingerprint"),
                "model": self._run.get("model"),
                "num_params": self._run.get("num_params"),
                "codec": self._run.get("codec"),
                "aggregate_codec": self._run.get("aggregate_codec"),
                "resumed": self._run.get("resumed", False),
                "state_sha256": last_round["state_sha256"] if last_round else self._run.get("state_sha256"),
                "phase": self._phase,
                "round": self._round,
                "rounds_total": self._run.get("rounds_total"),
                "rounds_closed": self._rounds_closed,
                "round_deadline_s": round_deadline_s,
                "seconds_to_deadline": seconds_to_deadline,
                "val_loss": self._loss[-1]["val_loss"] if self._loss else None,
                "loss_history": [dict(point) for point in self._loss],
                "tokens_per_s": last_tokens_per_s,
                "tokens_per_s_recent": recent_tokens_per_s,
                "round_s": last_round["round_s"] if last_round else None,
                "bytes_in": self._bytes_in,
                "bytes_out": self._bytes_out,
                "updates_accepted": self._accepted_total,
                "updates_rejected": sum(self._rejected_by_check.values()),
                "rejected_by_check": dict(self._rejected_by_check),
                "peers_active": sum(self._is_active(p) for p in self._peers.values()),
                "peers_known": len(self._peers),
                "peers_banned": sum(p.banned for p in self._peers.values()),
                "maddrs": list(self._maddrs),
                "join_command": f"peer --join {self._maddrs[0]}" if self._maddrs else None,
                "last_error": dict(self._last_error) if self._last_error else None,
            }

    def join(self) -> dict[str, Any] | None:
        """What `peer --join URL` asks for: the run and the aggregator's multiaddrs; None before it is ready."""
        with self._lock:
            if not self._maddrs:
                return None
            return {
                "run": self._run.get("run"),
                "fingerprint": self._run.get("fingerprint"),
                "maddrs": list(self._maddrs),
            }

    def peers(self, limit: int = MAX_PEERS) -> list[dict[str, Any]]:
        """Every known peer, most recently seen first: activity, verdict counts, last rejection, ban."""
        with self._lock:
            newest_first = itertools.islice(reversed(self._peers.items()), limit)
            return [
                {
                    "fingerprint": who,
                    "status": "banned" if p.banned else "active" if self._is_active(p) else "idle",
                    "last_seen_s": p.last_seen_s,
                    "last_round": p.last_round if p.last_round >= 0 else None,
                    "rounds_contributed": p.rounds_contributed,
                    "uploads": p.uploads,
                    "accepted": p.accepted,
                    "rejected": p.rejected,
                    "bytes_received": p.bytes_received,
                    "tokens_per_s": p.tokens_per_s,
                    "last_rejection": dict(p.last_rejection) if p.last_rejection else None,
                    "banned": p.banned,
                    "ban_reason": p.ban_reason,
                    "points": self._standings[who].points if who in self._standings else None,
                    "client_mode": self._client_modes.get(who),
                }
                for who, p in newest_first
            ]

    def rounds(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest closed rounds' summaries, newest first."""
        with self._lock:
            return [dict(r) for r in itertools.islice(reversed(self._rounds), limit)]

    def leaderboard(self, limit: int = MAX_STANDINGS) -> list[dict[str, Any]]:
        """Peers ranked by points (the ledger's credit), best first."""
        with self._lock:
            ranked = sorted(self._standings.items(), key=lambda kv: (-kv[1].points, kv[0]))[:limit]
            return [
                {
                    "rank": rank,
                    "fingerprint": who,
                    "public_key": s.public_key,
                    "points": s.points,
                    "accepted": s.accepted,
                }
                for rank, (who, s) in enumerate(ranked, start=1)
            ]

    def ledger_head(self) -> dict[str, Any] | None:
        """The ledger's latest signed chain head, or None before the aggregator reported one."""
        with self._lock:
            return dict(self._ledger_head) if self._ledger_head is not None else None

    def rejections(self, limit: int = MAX_REJECTIONS) -> list[dict[str, Any]]:
        """The latest rejected updates with their check and reason, newest first."""
        with self._lock:
            return [dict(r) for r in itertools.islice(reversed(self._rejections), limit)]

    def _is_active(self, peer: _Peer) -> bool:
        return not peer.banned and self._round is not None and peer.last_round >= self._round - ACTIVE_ROUNDS
