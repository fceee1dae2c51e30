"""A peer's own view of its work, folded from the peer's events: what it trained, sent and earned."""

import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from potluck.events import Event, Finished, PeerDone, PeerRound, PeerSynced, ReceiptReceived, StateRefused
from potluck.web.status import cut, finite, fold

MAX_LOSS_POINTS = 1000  # one local training loss per round

PeerPhase = Literal["syncing", "training", "finished", "stopped"]


class PeerStatus:
    """The peer's status: `handle` every peer event, read `status()` from any thread."""

    def __init__(self) -> None:
        """An empty status: no run joined yet."""
        self._lock = threading.Lock()
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            PeerSynced: self._on_synced,
            PeerRound: self._on_round,
            ReceiptReceived: self._on_receipt,
            StateRefused: self._on_state_refused,
            Finished: self._on_finished,
            PeerDone: self._on_done,
        }
        self._identity: dict[str, Any] = {"fingerprint": None, "run": None, "aggregator": None}
        self._phase: PeerPhase = "syncing"
        self._round: int | None = None  # the round it works on
        self._loss: deque[dict[str, Any]] = deque(maxlen=MAX_LOSS_POINTS)
        self._tokens_per_s: float | None = None
        self._bytes_up = 0
        self._bytes_down = 0  # per-round traffic, summed
        self._state_bytes = 0  # full states downloaded to join or resync
        self._state_bytes_served = 0  # chunks of the state this peer gave joiners (a running total)
        self._rounds_done = 0
        self._accepted = 0
        self._rejected = 0
        self._receipts = 0  # final receipts for accepted updates
        self._score_total = 0.0
        self._tokens_credited = 0
        self._last_rejection: dict[str, Any] | None = None
        self._state_refusals = 0
        self._finished = False
        self._detail: str | None = None

    def handle(self, event: Event) -> None:
        """Fold one peer event in; other kinds are ignored and a failing fold never raises."""
        fold(self._handlers, event, self._lock, "peer status")

    def _on_synced(self, e: PeerSynced) -> None:
        self._identity = {"fingerprint": cut(e.fingerprint), "run": cut(e.run), "aggregator": cut(e.aggregator)}
        self._round = e.round
        self._state_bytes += max(0, e.state_bytes)
        if self._phase == "syncing":
            self._phase = "training"

    def _on_round(self, e: PeerRound) -> None:
        done = e.round
        self._round = done + 1
        loss = finite(e.loss)
        if loss is not None:
            self._loss.append({"round": done, "loss": loss})
        if math.isfinite(e.tokens_per_s):
            self._tokens_per_s = e.tokens_per_s
        self._bytes_up += max(0, e.bytes_up)
        self._bytes_down += max(0, e.bytes_down)
        self._state_bytes_served = max(self._state_bytes_served, e.state_bytes_served)
        self._rounds_done += 1
        if e.accepted:
            self._accepted += 1
        else:
            self._rejected += 1
            self._last_rejection = {"round": done, "reason": cut(e.reason)}

    def _on_receipt(self, e: ReceiptReceived) -> None:
        if not e.accepted:
            self._last_rejection = {"round": e.round, "reason": cut(e.reason)}
            return
        self._receipts += 1
        self._score_total += e.score
        self._tokens_credited += max(0, e.tokens_credited)

    def _on_state_refused(self, e: StateRefused) -> None:
        self._state_refusals += 1

    def _on_finished(self, e: Finished) -> None:
        self._finished = True
        self._phase = "finished"
        self._detail = cut(e.detail)

    def _on_done(self, e: PeerDone) -> None:
        if self._phase != "finished":
            self._phase = "stopped"

    def status(self) -> dict[str, Any]:
        """The peer at a glance: its run, round, loss, speed, traffic, verdicts and earned receipts."""
        with self._lock:
            return {
                **self._identity,
                "phase": self._phase,
                "round": self._round,
                "loss": self._loss[-1]["loss"] if self._loss else None,
                "loss_history": [dict(point) for point in self._loss],
                "tokens_per_s": self._tokens_per_s,
                "bytes_up": self._bytes_up,
                "bytes_down": self._bytes_down,
                "state_bytes": self._state_bytes,
                "state_bytes_served": self._state_bytes_served,
                "rounds_done": self._rounds_done,
                "accepted": self._accepted,
                "rejected": self._rejected,
                "receipts": self._receipts,
                "score_total": self._score_total,
                "tokens_credited": self._tokens_credited,
                "last_rejection": dict(self._last_rejection) if self._last_rejection else None,
                "state_refusals": self._state_refusals,
                "finished": self._finished,
                "detail": self._detail,
            }
