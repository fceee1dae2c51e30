"""A peer's own view of its work, folded from the peer's events: what it trained, sent and earned."""

import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

from potluck.web.fields import flag, fold_event, integer, number, text

MAX_LOSS_POINTS = 1000  # one local training loss per round

PeerPhase = Literal["syncing", "training", "finished", "stopped"]


class PeerStatus:
    """The peer's status: `handle` every peer event, read `status()` from any thread."""

    def __init__(self) -> None:
        """An empty status: no run joined yet."""
        self._lock = threading.Lock()
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "synced": self._on_synced,
            "round": self._on_round,
            "receipt": self._on_receipt,
            "state-refused": self._on_state_refused,
            "finished": self._on_finished,
            "done": self._on_done,
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

    def handle(self, event: Mapping[str, Any]) -> None:
        """Fold one peer event in; unknown kinds are ignored and a malformed event never raises."""
        fold_event(event, self._handlers, self._lock, what="peer status")

    def _on_synced(self, e: Mapping[str, Any]) -> None:
        for key in ("fingerprint", "run", "aggregator"):
            self._identity[key] = text(e, key, default=self._identity[key])
        self._round = integer(e, "round", default=self._round)
        self._state_bytes += max(0, integer(e, "state_bytes", default=0))
        if self._phase == "syncing":
            self._phase = "training"

    def _on_round(self, e: Mapping[str, Any]) -> None:
        done = integer(e, "round")
        if done is not None:
            self._round = done + 1
        loss = number(e, "loss")
        if loss is not None:
            self._loss.append({"round": done, "loss": loss})
        self._tokens_per_s = number(e, "tokens_per_s", default=self._tokens_per_s)
        self._bytes_up += max(0, integer(e, "bytes_up", default=0))
        self._bytes_down += max(0, integer(e, "bytes_down", default=0))
        served = integer(e, "state_bytes_served", default=0)
        self._state_bytes_served = max(self._state_bytes_served, served if served is not None else 0)
        self._rounds_done += 1
        if flag(e, "accepted"):
            self._accepted += 1
        else:
            self._rejected += 1
            self._last_rejection = {"round": done, "reason": text(e, "reason", default="")}

    def _on_receipt(self, e: Mapping[str, Any]) -> None:
        if not flag(e, "accepted"):
            self._last_rejection = {"round": integer(e, "round"), "reason": text(e, "reason", default="")}
            return
        self._receipts += 1
        self._score_total += number(e, "score", default=0.0)
        self._tokens_credited += max(0, integer(e, "tokens_credited", default=0))

    def _on_state_refused(self, e: Mapping[str, Any]) -> None:
        self._state_refusals += 1

    def _on_finished(self, e: Mapping[str, Any]) -> None:
        self._finished = True
        self._phase = "finished"
        self._detail = text(e, "detail")

    def _on_done(self, e: Mapping[str, Any]) -> None:
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
