"""Repeated log lines, rate-limited: an error that recurs on every request must not fill the disk.

A node under a flood (half-open connections, a descriptor limit reached) can hit the same error
thousands of times a second; each is logged with its traceback, and one such flood grew a node's log
by 309 MB in 65 s. The filter here lets each call site through a few times per window and folds the rest
into a count carried by the first line of the next window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_PER_WINDOW = 5  # lines per call site per window: enough to see a problem begin, not to drown in it
WINDOW_S = 10.0
MAX_SITES = 1024  # call sites tracked at once; code has far fewer, so reaching this only clears stale ones


@dataclass(kw_only=True, slots=True)
class _Window:
    started_s: float
    passed: int = 0
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    """Pass at most `max_per_window` records per call site (logger, file, line) every `window_s` seconds.

    The first record after a window with suppressed records says how many were left out. The call site, not
    the message text, is the key, so messages built with f-strings are limited too.
    """

    def __init__(
        self,
        *,
        max_per_window: int = MAX_PER_WINDOW,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.max_per_window = max_per_window
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[tuple[str, str, int], _Window] = {}
        self._lock = threading.Lock()  # a handler filters outside its own lock, on whichever thread logs

    def filter(self, record: logging.LogRecord) -> bool:
        """True to emit `record` (with a note of what the last window left out), False to drop it."""
        with self._lock:
            return self._admit(record, self._clock())

    def _admit(self, record: logging.LogRecord, now: float) -> bool:
        key = (record.name, record.pathname, record.lineno)
        window = self._windows.get(key)
        if window is None or now - window.started_s >= self.window_s:
            if window is None and len(self._windows) >= MAX_SITES:
                self._forget_stale(now)
            left_out = window.suppressed if window is not None else 0
            window = self._windows[key] = _Window(started_s=now)
            if left_out:
                # a node's records reach one handler each (the root's; hivemind's does not propagate): nothing else
                # sees the rewritten message
                record.msg = f"{record.msg} (this message was repeated {left_out} more times, not shown)"
        if window.passed < self.max_per_window:
            window.passed += 1
            return True
        window.suppressed += 1
        return False

    def _forget_stale(self, now: float) -> None:
        """Drop windows that have ended (their unreported counts with them), or all when none has."""
        stale = [key for key, window in self._windows.items() if now - window.started_s >= self.window_s]
        for key in stale or list(self._windows):
            del self._windows[key]


def limit_repeats(logger: logging.Logger) -> None:
    """Give each of `logger`'s own handlers a RepeatFilter (once): for libraries that log through a handler of
    their own rather than the root's, as hivemind does."""
    for handler in logger.handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter())
