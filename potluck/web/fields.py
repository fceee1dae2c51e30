"""Typed reads of event fields: events are plain dicts whose text partly comes from untrusted peers.

A status page must never crash the process that feeds it, nor keep a hostile peer's megabyte-long
reason in memory, so every read checks the type, bounds the size and falls back to a default.
"""

import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

# Long enough for a 64-hex key, a multiaddr or a validation check's explanation, short enough that
# thousands of kept rejections stay a few megabytes.
MAX_TEXT_CHARS = 512


def text(
    event: Mapping[str, Any], key: str, *, default: str | None = None, max_chars: int = MAX_TEXT_CHARS
) -> str | None:
    """The field as a string cut to `max_chars`, or `default` when missing or not a string."""
    value = event.get(key)
    if not isinstance(value, str):
        return default
    return value[:max_chars]


def integer(event: Mapping[str, Any], key: str, *, default: int | None = None) -> int | None:
    """The field as an int, or `default` when missing or not an int (bools are not counts)."""
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return value


def number(event: Mapping[str, Any], key: str, *, default: float | None = None) -> float | None:
    """The field as a finite float, or `default`: JSON has no NaN or infinity, so a diverged loss reads as missing."""
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    value = float(value)
    return value if math.isfinite(value) else default


def flag(event: Mapping[str, Any], key: str, *, default: bool = False) -> bool:
    """The field as a bool, or `default` when missing or not a bool."""
    value = event.get(key)
    return value if isinstance(value, bool) else default


def records(event: Mapping[str, Any], key: str, *, max_items: int) -> list[Mapping[str, Any]]:
    """The field's dict items, at most `max_items` of them; anything else in the list is skipped."""
    value = event.get(key)
    if not isinstance(value, list):
        return []
    return [item for item in value[:max_items] if isinstance(item, Mapping)]


def texts(event: Mapping[str, Any], key: str, *, max_items: int) -> list[str]:
    """The field's string items cut to MAX_TEXT_CHARS, at most `max_items` of them."""
    value = event.get(key)
    if not isinstance(value, list):
        return []
    return [item[:MAX_TEXT_CHARS] for item in value[:max_items] if isinstance(item, str)]


def fold_event(
    event: Mapping[str, Any],
    handlers: Mapping[str, Callable[[Mapping[str, Any]], None]],
    lock: threading.Lock,
    *,
    what: str,
) -> None:
    """Run the handler of the event's kind under `lock`: unknown kinds are ignored, and a malformed event is
    logged and skipped, never raised (the node feeding `what` must keep running whatever an event holds)."""
    kind = event.get("event") if isinstance(event, Mapping) else None
    handler = handlers.get(kind) if isinstance(kind, str) else None
    if handler is None:
        return
    with lock:
        try:
            handler(event)
        except Exception:
            logger.warning("%s skipped a malformed %r event", what, kind, exc_info=True)
