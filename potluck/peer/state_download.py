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

from potluck.errors import PotluckError
from potluck.protocol.client import LinkError
from potluck.protocol.wire import RefusalCode

MAX_FAILURES = 3.0
BUSY_FAILURE = 0.2
DUPLICATES = 2  # donors that may fetch the same chunk at once, in the endgame
RETRY_PAUSE_S = 0.25  # times the donor's failures so far: a short back-off before it is asked again


class DownloadFailed(PotluckError):
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
    refuted: set[str] = field(default_factory=set)  # donors that sent a chunk the signed manifest refutes


async def fetch_chunks(
    digests: Sequence[bytes],
    *,
    payload_bytes: int,
    chunk_bytes: int,
    donors: Sequence[Donor],
    more: Awaitable[Sequence[Donor]] | None = None,
) -> Fetched:
    """The payload the manifest `digests` describes, from `donors`; DownloadFailed when they cannot give it all.

    `more`, when given, finds further donors while the first ones already give chunks (a DHT lookup
    of the holders): the download neither waits for it nor fails when it does.
    """
    count = len(digests)
    out = bytearray(payload_bytes)  # payload_bytes is bounded by the caller before this allocates
    pending = deque(range(count))
    flying: dict[int, set[str]] = {}  # chunk -> donors fetching it now, oldest request first
    done: set[int] = set()
    result = Fetched(payload=b"", bytes_by_donor={d.name: 0 for d in donors})
    failures = dict.fromkeys(result.bytes_by_donor, 0.0)
    changed = asyncio.Condition()

    def span(index: int) -> tuple[int, int]:
        return index * chunk_bytes, min((index + 1) * chunk_bytes, payload_bytes)

    def spare(donor: Donor) -> int | None:
        """Endgame: with nothing left to hand out, an idle donor also fetches the oldest chunk still in flight
        elsewhere, so one slow donor does not hold up the end of the download (the first copy wins)."""
        return next(
            (i for i, by in flying.items() if i not in done and donor.name not in by and len(by) < DUPLICATES), None
        )

    def next_chunk(donor: Donor) -> int | None:
        return pending[0] if pending else spare(donor)

    async def work(donor: Donor) -> None:
        while True:
            async with changed:
                # read when woken, as meant: the state now, not when the lambda was made
                await changed.wait_for(
                    lambda: len(done) == count or donor.name in result.dropped or next_chunk(donor) is not None  # noqa: B023
                )
                if len(done) == count or donor.name in result.dropped:
                    return
                index = pending.popleft() if pending else spare(donor)
                assert index is not None
                flying.setdefault(index, set()).add(donor.name)
            ok, pause = False, 0.0
            try:
                data = await donor.fetch(index)
                start, end = span(index)
                if len(data) != end - start or hashlib.sha256(data).digest() != digests[index]:
                    result.dropped.setdefault(donor.name, f"chunk {index} does not match the signed manifest")
                    result.refuted.add(donor.name)
                else:
                    if index not in done:  # an endgame copy may have come first
                        out[start:end] = data
                        result.bytes_by_donor[donor.name] += len(data)
                        done.add(index)
                    ok = True
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a donor's failure is its own: the chunk goes to another
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                busy = isinstance(e, LinkError) and e.code is RefusalCode.BUSY
                failures[donor.name] += BUSY_FAILURE if busy else 1.0
                if failures[donor.name] >= MAX_FAILURES:
                    result.dropped.setdefault(donor.name, text)
                pause = RETRY_PAUSE_S * failures[donor.name]
            finally:
                async with changed:
                    flying[index].discard(donor.name)
                    if not flying[index]:
                        del flying[index]
                        if not ok and index not in done:
                            pending.appendleft(index)
                    changed.notify_all()
            if pause:
                await asyncio.sleep(pause)  # a back-off, not a synchronization: other donors take the chunk

    tasks = [asyncio.create_task(work(d)) for d in donors for _ in range(max(1, d.streams))]

    async def recruit(found: Awaitable[Sequence[Donor]]) -> None:
        try:
            extra = [d for d in await found if d.name not in result.bytes_by_donor]
        except Exception:  # noqa: BLE001 - no more donors: the first ones carry on
            return
        for d in extra:
            result.bytes_by_donor[d.name] = 0
            failures[d.name] = 0.0
            tasks.extend(asyncio.create_task(work(d)) for _ in range(max(1, d.streams)))

    recruiter = asyncio.create_task(recruit(more)) if more is not None else None
    try:
        while len(done) < count:
            running = [t for t in tasks if not t.done()]
            if recruiter is not None and not recruiter.done():
                running.append(recruiter)
            if not running:
                break
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    finally:
        everything = [*tasks, *([recruiter] if recruiter is not None else [])]
        for t in everything:
            t.cancel()  # endgame copies still in flight, donors still waiting
        outcomes = await asyncio.gather(*everything, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome  # a bug in the loop above, not a donor's failure (those are caught in work)
    if len(done) < count:
        missing = count - len(done)
        why = "; ".join(f"{name}: {reason}" for name, reason in result.dropped.items()) or "no donors"
        raise DownloadFailed(f"{missing} of {count} state chunks could not be fetched ({why})")
    result.payload = bytes(out)
    return result
