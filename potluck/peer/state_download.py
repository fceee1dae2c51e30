"""One state from several holders at once: chunks spread over donors, each checked against the signed manifest.

Every donor (the aggregator, and peers that hold the same shard at the same version) gets a few
workers that take the next chunk nobody has; a fast donor therefore serves more chunks than a slow
one, and none serves them all. A chunk whose sha256 differs from the manifest's is refused, its donor
is dropped for the rest of the download, and the chunk goes back for another donor. A donor that fails
to answer is dropped after MAX_FAILURES tries ("busy" counts a fifth of a failure: it is a donor
protecting its link, not a broken one).
"""

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from potluck.protocol.messages import BUSY_PREFIX

MAX_FAILURES = 3.0
BUSY_FAILURE = 0.2
RETRY_PAUSE_S = 0.25  # times the donor's failures so far: a short back-off before it is asked again


class DownloadFailed(Exception):
    """No donor left could give some chunk (one line, naming what each donor did)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Donor:
    """Somewhere to fetch chunks from: `fetch(index)` returns chunk `index`'s bytes or raises."""

    name: str  # how events and errors name it (a fingerprint)
    fetch: Callable[[int], Awaitable[bytes]]
    streams: int = 2  # chunks asked of it at once


@dataclass(kw_only=True, slots=True)
class Fetched:
    """A whole payload and who gave what."""

    payload: bytes
    bytes_by_donor: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # donor -> why it was dropped (one line)


async def fetch_chunks(
    digests: Sequence[bytes], *, payload_bytes: int, chunk_bytes: int, donors: Sequence[Donor]
) -> Fetched:
    """The payload the manifest `digests` describes, from `donors`; DownloadFailed when they cannot give it all."""
    count = len(digests)
    out = bytearray(payload_bytes)  # payload_bytes is bounded by the caller before this allocates
    pending = deque(range(count))
    result = Fetched(payload=b"", bytes_by_donor={d.name: 0 for d in donors})
    failures = dict.fromkeys(result.bytes_by_donor, 0.0)
    in_flight = 0
    changed = asyncio.Condition()

    def span(index: int) -> tuple[int, int]:
        return index * chunk_bytes, min((index + 1) * chunk_bytes, payload_bytes)

    async def work(donor: Donor) -> None:
        nonlocal in_flight
        while True:
            async with changed:
                # read when woken, as meant: the chunks in flight now, not when the lambda was made
                await changed.wait_for(lambda: bool(pending) or in_flight == 0 or donor.name in result.dropped)  # noqa: B023
                if donor.name in result.dropped or not pending:
                    return
                index = pending.popleft()
                in_flight += 1
            done, pause = False, 0.0
            try:
                data = await donor.fetch(index)
                start, end = span(index)
                if len(data) != end - start or hashlib.sha256(data).digest() != digests[index]:
                    result.dropped.setdefault(donor.name, f"chunk {index} does not match the signed manifest")
                else:
                    out[start:end] = data
                    result.bytes_by_donor[donor.name] += len(data)
                    done = True
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a donor's failure is its own: the chunk goes to another
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failures[donor.name] += BUSY_FAILURE if BUSY_PREFIX in text else 1.0
                if failures[donor.name] >= MAX_FAILURES:
                    result.dropped.setdefault(donor.name, text)
                pause = RETRY_PAUSE_S * failures[donor.name]
            finally:
                async with changed:
                    in_flight -= 1
                    if not done:
                        pending.appendleft(index)
                    changed.notify_all()
            if pause:
                await asyncio.sleep(pause)  # a back-off, not a synchronization: other donors take the chunk

    await asyncio.gather(*(work(d) for d in donors for _ in range(max(1, d.streams))))
    if pending:
        why = "; ".join(f"{name}: {reason}" for name, reason in result.dropped.items()) or "no donors"
        raise DownloadFailed(f"{len(pending)} of {count} state chunks could not be fetched ({why})")
    result.payload = bytes(out)
    return result
