"""One state from several holders at once: chunks spread over donors, each checked against the signed manifest.

Every donor (the aggregator, and peers that hold the same shard at the same version) gets a few
workers that take the next chunk nobody has; a fast donor therefore serves more chunks than a slow
one, and none serves them all. A chunk whose sha256 differs from the manifest's is refused, its donor
is dropped for the rest of the download, and the chunk goes back for another donor. A donor that fails
to answer is dropped after MAX_FAILURES tries ("busy" counts a fifth of a failure: it is a donor
protecting its link, not a broken one); a donor with a `timeout_s` (a holding peer) that sends nothing
within it is dropped at once, so a silent one costs a download that long, once, not a retry per chunk.
"""

import asyncio
import hashlib
import inspect
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
    timeout_s: float | None = None  # a chunk not in by then drops the donor at once (None: `fetch`'s own limit)


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
    known: tuple[int, str, bytes] | None = None,
) -> Fetched:
    """The payload the manifest `digests` describes, from `donors`; DownloadFailed when they cannot give it all.

    `more`, when given, finds further donors while the first ones already give chunks (a DHT lookup
    of the holders): the download neither waits for it nor fails when it does. `known`: a chunk already
    in hand (its index, the donor that gave it, its bytes; checked like any other), not fetched again.
    """
    download = _Download(digests, payload_bytes=payload_bytes, chunk_bytes=chunk_bytes, donors=donors)
    if known is not None:
        download.keep(*known)
    return await download.run(more)


class _Download:
    """One payload's download in progress: which chunks wait, which are in flight and with whom, which are done."""

    def __init__(
        self, digests: Sequence[bytes], *, payload_bytes: int, chunk_bytes: int, donors: Sequence[Donor]
    ) -> None:
        self.digests = digests
        self.count = len(digests)
        self.payload_bytes = payload_bytes
        self.chunk_bytes = chunk_bytes
        self.out = bytearray(payload_bytes)  # payload_bytes is bounded by the caller before this allocates
        self.pending = deque(range(self.count))
        self.flying: dict[int, set[str]] = {}  # chunk -> donors fetching it now, oldest request first
        self.done: set[int] = set()
        self.result = Fetched(payload=b"", bytes_by_donor={d.name: 0 for d in donors})
        self.failures = dict.fromkeys(self.result.bytes_by_donor, 0.0)
        self.changed = asyncio.Condition()
        self.tasks: list[asyncio.Task[None]] = []
        for d in donors:
            self._start(d)

    def _start(self, donor: Donor) -> None:
        self.tasks.extend(asyncio.create_task(self._work(donor)) for _ in range(max(1, donor.streams)))

    def keep(self, index: int, donor: str, data: bytes) -> None:
        """A chunk fetched before the download started: kept (and credited to `donor`) if the manifest agrees."""
        start, end = self._span(index)
        if index in self.pending and len(data) == end - start and hashlib.sha256(data).digest() == self.digests[index]:
            self.out[start:end] = data
            self.result.bytes_by_donor[donor] = self.result.bytes_by_donor.get(donor, 0) + len(data)
            self.done.add(index)
            self.pending.remove(index)

    def _span(self, index: int) -> tuple[int, int]:
        return index * self.chunk_bytes, min((index + 1) * self.chunk_bytes, self.payload_bytes)

    def _spare(self, donor: Donor) -> int | None:
        """Endgame: with nothing left to hand out, an idle donor also fetches the oldest chunk still in flight
        elsewhere, so one slow donor does not hold up the end of the download (the first copy wins)."""
        return next(
            (
                i
                for i, by in self.flying.items()
                if i not in self.done and donor.name not in by and len(by) < DUPLICATES
            ),
            None,
        )

    def _next_chunk(self, donor: Donor) -> int | None:
        return self.pending[0] if self.pending else self._spare(donor)

    def _through(self, donor: Donor) -> bool:
        """Whether `donor` has nothing more to do: every chunk is in, or it was dropped."""
        return len(self.done) == self.count or donor.name in self.result.dropped

    async def _work(self, donor: Donor) -> None:
        """One of `donor`'s streams: take the next chunk nobody has, fetch it, check it, until it is through."""
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: self._through(donor) or self._next_chunk(donor) is not None)
                if self._through(donor):
                    return
                index = self.pending.popleft() if self.pending else self._spare(donor)
                assert index is not None
                self.flying.setdefault(index, set()).add(donor.name)
            pause = await self._fetch(donor, index)
            if pause:
                await asyncio.sleep(pause)  # a back-off, not a synchronization: other donors take the chunk

    async def _fetch(self, donor: Donor, index: int) -> float:
        """Chunk `index` from `donor`, kept if it matches the manifest; the pause before asking `donor` again."""
        ok, pause = False, 0.0
        try:
            try:
                data = await asyncio.wait_for(donor.fetch(index), donor.timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                self.failures[donor.name] = MAX_FAILURES
                self.result.dropped.setdefault(donor.name, f"sent no chunk within {donor.timeout_s:.0f} s")
                raise
            start, end = self._span(index)
            if len(data) != end - start or hashlib.sha256(data).digest() != self.digests[index]:
                self.result.dropped.setdefault(donor.name, f"chunk {index} does not match the signed manifest")
                self.result.refuted.add(donor.name)
            else:
                if index not in self.done:  # an endgame copy may have come first
                    self.out[start:end] = data
                    self.result.bytes_by_donor[donor.name] += len(data)
                    self.done.add(index)
                ok = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a donor's failure is its own: the chunk goes to another
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            busy = isinstance(e, LinkError) and e.code is RefusalCode.BUSY
            self.failures[donor.name] += BUSY_FAILURE if busy else 1.0
            if self.failures[donor.name] >= MAX_FAILURES:
                self.result.dropped.setdefault(donor.name, text)
            pause = RETRY_PAUSE_S * self.failures[donor.name]
        finally:
            async with self.changed:
                self.flying[index].discard(donor.name)
                if not self.flying[index]:
                    del self.flying[index]
                    if not ok and index not in self.done:
                        self.pending.appendleft(index)
                self.changed.notify_all()
        return pause

    async def _recruit(self, found: Awaitable[Sequence[Donor]]) -> None:
        """Add the donors `found` names (those not already giving), once it has named them."""
        try:
            extra = [d for d in await found if d.name not in self.result.bytes_by_donor]
        except Exception:  # noqa: BLE001 - no more donors: the first ones carry on
            return
        for d in extra:
            self.result.bytes_by_donor[d.name] = 0
            self.failures[d.name] = 0.0
            self._start(d)

    async def run(self, more: Awaitable[Sequence[Donor]] | None) -> Fetched:
        """Wait until every chunk is in or no donor is left; the payload, or DownloadFailed."""
        recruiter = asyncio.create_task(self._recruit(more)) if more is not None else None
        try:
            while len(self.done) < self.count:
                running = [t for t in self.tasks if not t.done()]
                if recruiter is not None and not recruiter.done():
                    running.append(recruiter)
                if not running:
                    break
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        finally:
            everything = [*self.tasks, *([recruiter] if recruiter is not None else [])]
            for t in everything:
                t.cancel()  # endgame copies still in flight, donors still waiting
            outcomes = await asyncio.gather(*everything, return_exceptions=True)
            if inspect.iscoroutine(more):
                more.close()  # the recruiter was cancelled before it began: `more` was never awaited, now closed
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome  # a bug in the loop above, not a donor's failure (those are caught in _work)
        if len(self.done) < self.count:
            missing = self.count - len(self.done)
            why = "; ".join(f"{name}: {reason}" for name, reason in self.result.dropped.items()) or "no donors"
            raise DownloadFailed(f"{missing} of {self.count} state chunks could not be fetched ({why})")
        self.result.payload = bytes(self.out)
        return self.result
