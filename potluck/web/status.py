"""The aggregator's run as the status page shows it: a fold over the aggregator's events.

The aggregator emits typed events (potluck.events, the same ones `--json` prints); `RunStatus.handle`
folds each into a small state and the snapshot methods hand out JSON-able copies. Everything kept is
bounded, because peers' activity (new keys, rejections with their reasons) drives how much arrives.
"""

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from potluck.events import (
    AcceptedUpdate,
    AggregatorDone,
    AggregatorReady,
    Banned,
    Credit,
    Event,
    Joined,
    LedgerHead,
    RoundClosed,
    RoundError,
    RoundOpened,
    Unbanned,
    UpdateReceived,
    UpdateRejected,
)

logger = logging.getLogger(__name__)

# Long enough for a 64-hex key, a multiaddr or a validation check's explanation, short enough that
# thousands of kept rejections stay a few megabytes (their reasons partly come from untrusted peers).
MAX_TEXT_CHARS = 512
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


def cut(text: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """`text` cut to `max_chars`: a hostile peer's megabyte-long reason is not kept whole."""
    return text[:max_chars]


def finite(value: float | None) -> float | None:
    """`value` when finite, else None: JSON has no NaN or infinity, so a diverged loss reads as missing."""
    return value if value is not None and math.isfinite(value) else None


def fold(handlers: Mapping[type[Event], Callable[[Any], None]], event: Event, lock: threading.Lock, what: str) -> None:
    """Run the handler of the event's type under `lock`: other types are ignored, and a handler's failure
    is logged, never raised (the node feeding `what` must keep running whatever an event holds)."""
    handler = handlers.get(type(event))
    if handler is None:
        return
    with lock:
        try:
            handler(event)
        except Exception:
            logger.warning("%s skipped a %s event it could not fold", what, type(event).__name__, exc_info=True)


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
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            AggregatorReady: self._on_ready,
            RoundOpened: self._on_round_open,
            UpdateReceived: self._on_received,
            Joined: self._on_joined,
            UpdateRejected: self._on_rejected,
            Banned: self._on_banned,
            Unbanned: self._on_unbanned,
            RoundClosed: self._on_round,
            RoundError: self._on_error,
            AggregatorDone: self._on_done,
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

    def handle(self, event: Event) -> None:
        """Fold one aggregator event in; other kinds are ignored and a failing fold never raises."""
        fold(self._handlers, event, self._lock, "status page")

    def _on_ready(self, e: AggregatorReady) -> None:
        self._run = {
            "run": cut(e.run),
            "config_hash": cut(e.config_hash),
            "fingerprint": cut(e.fingerprint),
            "model": cut(e.model),
            "num_params": e.num_params,
            "codec": cut(e.codec),
            "aggregate_codec": cut(e.aggregate_codec),
            "rounds_total": e.rounds_total,
            "round_deadline_s": finite(e.round_deadline_s),
            "resumed": e.resumed,
            "state_sha256": cut(e.state_sha256),
        }
        self._maddrs = [m[:MAX_TEXT_CHARS] for m in e.maddrs[:MAX_MADDRS]]
        self._round = e.round
        self._phase = "collecting"
        val_loss = finite(e.val_loss)
        if val_loss is not None and not self._loss:
            # The state the run starts from: round -1 for a fresh run, the last closed round on resume.
            self._loss.append({"round": self._round - 1, "val_loss": val_loss})
        self._set_ledger_head(e.ledger_head)
        self._standings = {
            cut(item.fingerprint): _Standing(
                public_key=cut(item.public_key), points=item.points, accepted=item.accepted
            )
            for item in e.leaderboard[:MAX_STANDINGS]
        }

    def _on_round_open(self, e: RoundOpened) -> None:
        self._round = e.round
        self._round_deadline_s = finite(e.deadline_s)
        opened_at_s = e.time_s if math.isfinite(e.time_s) else self._clock()
        self._deadline_at_s = None if self._round_deadline_s is None else opened_at_s + self._round_deadline_s
        if self._phase != "finished":
            self._phase = "collecting"

    def _on_received(self, e: UpdateReceived) -> None:
        peer = self._peer(cut(e.fingerprint), seen_s=finite(e.time_s))
        if peer is None:
            return
        peer.uploads += 1
        peer.bytes_received += max(0, e.bytes)
        peer.saw_round(e.round)

    def _on_joined(self, e: Joined) -> None:
        # A state download names a key without proving it: keep the mode aside (bounded), not as a peer.
        who = cut(e.fingerprint)
        self._client_modes[who] = "client" if e.client_mode else "listening"  # dials out only, or accepts
        self._client_modes.move_to_end(who)
        if len(self._client_modes) > MAX_PEERS:
            self._client_modes.popitem(last=False)

    def _on_rejected(self, e: UpdateRejected) -> None:
        check = cut(e.check, 64)
        rejection = {
            "round": e.round,
            "fingerprint": cut(e.fingerprint),
            "check": check,
            "reason": cut(e.reason),
            "update": None if e.update is None else cut(e.update, 64),
            "time_s": self._clock(),
        }
        self._rejections.append(rejection)
        if check not in self._rejected_by_check and len(self._rejected_by_check) >= MAX_CHECKS:
            check = "other"
        self._rejected_by_check[check] = self._rejected_by_check.get(check, 0) + 1
        peer = self._peer(cut(e.fingerprint))
        if peer is not None:
            peer.rejected += 1
            peer.last_rejection = {k: rejection[k] for k in ("round", "check", "reason")}

    def _on_banned(self, e: Banned) -> None:
        peer = self._peer(cut(e.fingerprint))
        if peer is not None:
            peer.banned = True
            peer.ban_reason = cut(e.reason)

    def _on_unbanned(self, e: Unbanned) -> None:
        peer = self._peers.get(cut(e.fingerprint))
        if peer is not None:
            peer.banned = False
            peer.ban_reason = None

    def _on_round(self, e: RoundClosed) -> None:
        closed = e.round
        closed_at_s = e.time_s if math.isfinite(e.time_s) else self._clock()
        round_s = finite(e.round_s)
        if round_s is not None and round_s <= 0:
            round_s = None  # a zero-length round has no rate
        tokens = max(0, e.tokens)
        val_loss = finite(e.val_loss)
        accepted: tuple[AcceptedUpdate, ...] = e.accepted[:MAX_ROUND_ENTRIES]
        tokens_per_s = tokens / round_s if round_s is not None else None
        self._rounds_closed += 1
        if self._round is None or closed >= self._round:
            # else the next round's open event came first: its round and countdown stand
            self._round = closed + 1
            self._round_deadline_s = self._deadline_at_s = None
        rounds_total = self._run.get("rounds_total")
        if rounds_total is not None and closed + 1 >= rounds_total:
            self._phase = "finished"
        if val_loss is not None:
            self._loss.append({"round": closed, "val_loss": val_loss})
        if round_s is not None:
            self._throughput.append((tokens, round_s))
        self._bytes_in = e.bytes_in
        self._bytes_out = e.bytes_out
        self._set_ledger_head(e.ledger_head)
        self._accepted_total += len(accepted)
        for item in accepted:
            peer = self._peer(cut(item.fingerprint), seen_s=closed_at_s)
            if peer is None:
                continue
            peer.accepted += 1
            peer.saw_round(closed)
            if round_s is not None:
                peer.tokens_per_s = max(0, item.tokens) / round_s
        for credit in e.credits[:MAX_ROUND_ENTRIES]:  # what the ledger booked
            self._credit(credit)
        self._rounds.append(
            {
                "round": closed,
                "closed_by": cut(e.closed_by, 32),
                "val_loss": val_loss,
                "accepted": len(accepted),
                "rejected": max(0, e.rejected),
                "tokens": tokens,
                "tokens_per_s": tokens_per_s,
                "round_s": round_s,
                "aggregation_s": finite(e.aggregation_s),
                "aggregate_bytes": e.aggregate_bytes,
                "state_sha256": cut(e.state_sha256),
                "time_s": closed_at_s,
            }
        )

    def _on_error(self, e: RoundError) -> None:
        self._last_error = {"round": e.round, "detail": cut(e.detail), "time_s": self._clock()}

    def _on_done(self, e: AggregatorDone) -> None:
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

    def _credit(self, item: Credit) -> None:
        who = cut(item.fingerprint)
        standing = self._standings.get(who)
        if standing is None:
            standing = self._standings[who] = _Standing(public_key=cut(item.public_key))
            if len(self._standings) > MAX_STANDINGS:
                lowest = min(self._standings, key=lambda k: self._standings[k].points)
                del self._standings[lowest]
        standing.points += item.credit
        standing.accepted += 1

    def _set_ledger_head(self, head: LedgerHead | None) -> None:
        if head is not None:  # passed through as the ledger signed it
            self._ledger_head = dataclasses.asdict(head)

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
