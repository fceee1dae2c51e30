"""One state from several donors: the chunks spread over them, and a bad or silent donor costs nothing."""

import asyncio
import hashlib
import inspect

import pytest

from potluck.peer.state_download import Donor, DownloadFailed, fetch_chunks
from potluck.protocol.client import AggregatorUnreachable
from potluck.protocol.wire import RefusalCode

CHUNK = 1024
PAYLOAD = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(10 * CHUNK // 32 + 3))  # 10 chunks+
DIGESTS = [hashlib.sha256(PAYLOAD[i : i + CHUNK]).digest() for i in range(0, len(PAYLOAD), CHUNK)]


def _honest(name: str, asked: list[int] | None = None, *, streams: int = 2) -> Donor:
    async def fetch(index: int) -> bytes:
        if asked is not None:
            asked.append(index)
        await asyncio.sleep(0)  # let the other donors' workers run in between
        return PAYLOAD[index * CHUNK : (index + 1) * CHUNK]

    return Donor(name=name, fetch=fetch, streams=streams)


def _failing(name: str, error: Exception, asked: list[int]) -> Donor:
    async def fetch(index: int) -> bytes:
        asked.append(index)
        raise error

    return Donor(name=name, fetch=fetch)


def _run(*donors: Donor):  # noqa: ANN202
    return asyncio.run(fetch_chunks(DIGESTS, payload_bytes=len(PAYLOAD), chunk_bytes=CHUNK, donors=donors))


def test_every_donor_gives_a_share_and_the_payload_is_whole() -> None:
    a, b, c = [], [], []

    got = _run(_honest("a", a), _honest("b", b), _honest("c", c))

    assert got.payload == PAYLOAD and got.dropped == {}
    assert sorted(set(a + b + c)) == list(range(len(DIGESTS)))
    assert len(a + b + c) <= len(DIGESTS) + 5  # a chunk is asked twice only in the endgame, by an idle stream
    assert all(got.bytes_by_donor[name] > 0 for name in "abc")
    assert sum(got.bytes_by_donor.values()) == len(PAYLOAD)


def test_a_donor_whose_chunk_refutes_the_manifest_is_dropped_and_its_chunk_fetched_elsewhere() -> None:
    asked: list[int] = []

    async def lie(index: int) -> bytes:
        asked.append(index)
        return b"\x00" * CHUNK

    got = _run(Donor(name="liar", fetch=lie), _honest("honest"))

    assert got.payload == PAYLOAD
    assert got.bytes_by_donor["liar"] == 0 and "does not match the signed manifest" in got.dropped["liar"]
    assert got.refuted == {"liar"}
    assert len(asked) <= 2  # one refused chunk per stream, then it is never asked again


def test_a_silent_donor_is_dropped_after_its_tries_and_a_busy_one_is_given_more() -> None:
    silent, busy = [], []

    got = _run(
        _failing("silent", ConnectionError("stream reset"), silent),
        _failing("busy", AggregatorUnreachable("serving 4 chunks already", code=RefusalCode.BUSY), busy),
        _honest("honest"),
    )

    assert got.payload == PAYLOAD and got.bytes_by_donor["honest"] == len(PAYLOAD)
    assert len(silent) <= 3 and got.dropped.get("silent", "stream reset") == "stream reset"
    assert "busy" not in got.dropped  # busy costs a fifth of a try: it is asked again later
    assert not got.refuted


def test_busy_is_the_code_not_the_words() -> None:
    worded = []
    _run(_failing("worded", ConnectionError("busy: serving 4 chunks already"), worded), _honest("honest"))
    assert len(worded) <= 3  # a plain failure, however it is worded: dropped after its tries


def test_without_an_honest_donor_the_download_fails_in_one_line_naming_each() -> None:
    async def lie(index: int) -> bytes:
        return b"\x00" * CHUNK

    silent: list[int] = []

    with pytest.raises(DownloadFailed, match=r"could not be fetched \(liar: chunk \d+ does not match.*silent: gone"):
        _run(Donor(name="liar", fetch=lie), _failing("silent", ConnectionError("gone"), silent))

    assert len(silent) == 3  # MAX_FAILURES tries, then dropped


def test_donors_found_during_the_download_join_it_and_a_failed_lookup_costs_nothing() -> None:
    async def found_later() -> list[Donor]:
        await asyncio.sleep(0)
        return [_honest("late")]

    async def lookup_fails() -> list[Donor]:
        raise TimeoutError("DHT lookup timed out")

    async def scenario():  # noqa: ANN202
        late = await fetch_chunks(
            DIGESTS,
            payload_bytes=len(PAYLOAD),
            chunk_bytes=CHUNK,
            donors=[_failing("gone", ConnectionError("gone"), [])],
            more=found_later(),
        )
        alone = await fetch_chunks(
            DIGESTS, payload_bytes=len(PAYLOAD), chunk_bytes=CHUNK, donors=[_honest("first")], more=lookup_fails()
        )
        return late, alone

    late, alone = asyncio.run(scenario())

    assert late.payload == PAYLOAD and late.bytes_by_donor == {"gone": 0, "late": len(PAYLOAD)}
    assert alone.payload == PAYLOAD and alone.bytes_by_donor == {"first": len(PAYLOAD)}


def test_a_slow_donors_last_chunk_is_fetched_again_by_an_idle_one_and_the_first_copy_wins() -> None:
    stuck = asyncio.Event()  # never set: the slow donor never answers

    async def slow(index: int) -> bytes:
        await stuck.wait()
        return b""

    async def scenario():  # noqa: ANN202
        return await asyncio.wait_for(
            fetch_chunks(
                DIGESTS,
                payload_bytes=len(PAYLOAD),
                chunk_bytes=CHUNK,
                donors=[Donor(name="slow", fetch=slow, streams=1), _honest("fast", streams=1)],
            ),
            timeout=10,
        )

    got = asyncio.run(scenario())

    assert got.payload == PAYLOAD and got.bytes_by_donor == {"slow": 0, "fast": len(PAYLOAD)}


def test_a_chunk_already_fetched_is_never_asked_again_while_a_slow_copy_is_still_in_flight() -> None:
    stuck = asyncio.Event()  # never set: each slow donor holds its first chunk until the download ends
    fast_asked: list[int] = []

    async def slow(index: int) -> bytes:
        await stuck.wait()
        return b""

    async def scenario():  # noqa: ANN202
        return await asyncio.wait_for(
            fetch_chunks(
                DIGESTS,
                payload_bytes=len(PAYLOAD),
                chunk_bytes=CHUNK,
                donors=[
                    Donor(name="slow-1", fetch=slow, streams=1),
                    Donor(name="slow-2", fetch=slow, streams=1),
                    _honest("fast", fast_asked, streams=1),
                ],
            ),
            timeout=10,
        )

    got = asyncio.run(scenario())

    assert got.payload == PAYLOAD
    assert sorted(fast_asked) == list(range(len(DIGESTS)))  # each once, the slow ones' chunks as copies


@pytest.mark.parametrize("good", [True, False], ids=["kept", "refuted"])
def test_a_chunk_in_hand_is_kept_and_credited_unless_the_manifest_refutes_it(good: bool) -> None:
    # A joiner reads the run's config from the aggregator's first chunk before the download starts.
    asked: list[int] = []
    first = PAYLOAD[:CHUNK] if good else b"\x00" * CHUNK

    got = asyncio.run(
        fetch_chunks(
            DIGESTS,
            payload_bytes=len(PAYLOAD),
            chunk_bytes=CHUNK,
            donors=[_honest("holder", asked)],
            known=(0, "aggregator", first),
        )
    )

    assert got.payload == PAYLOAD
    assert (0 in asked) is not good
    assert got.bytes_by_donor.get("aggregator", 0) == (CHUNK if good else 0)


def test_a_download_complete_before_the_holder_lookup_starts_closes_the_lookup() -> None:
    # Prepare: the state's one chunk is in hand already (a tiny model's), so the lookup of more donors never runs
    chunk = PAYLOAD[:CHUNK]

    async def holders() -> list[Donor]:
        return []

    lookup = holders()
    # Execute
    fetching = fetch_chunks(
        DIGESTS[:1], payload_bytes=CHUNK, chunk_bytes=CHUNK, donors=[_honest("a")], more=lookup, known=(0, "a", chunk)
    )
    got = asyncio.run(fetching)
    # Assert: closed, not left for the garbage collector to warn that it was never awaited
    assert got.payload == chunk
    assert inspect.getcoroutinestate(lookup) == inspect.CORO_CLOSED


def test_donors_that_send_nothing_in_time_are_dropped_at_once_and_cost_the_download_that_time_once() -> None:
    # Prepare: two holders that never answer, each fetch left hanging, with a short limit of their own
    asked: list[str] = []

    def silent(name: str) -> Donor:
        async def fetch(index: int) -> bytes:
            asked.append(name)
            await asyncio.Event().wait()  # never set: no reply, ever
            raise AssertionError("unreachable")

        return Donor(name=name, fetch=fetch, streams=1, timeout_s=0.2)

    async def slow(index: int) -> bytes:
        await asyncio.sleep(0.05)  # the whole payload takes longer than the fakes' limit
        return PAYLOAD[index * CHUNK : (index + 1) * CHUNK]

    # Execute
    got = _run(silent("fake-1"), silent("fake-2"), Donor(name="aggregator", fetch=slow, streams=1))
    # Assert: each was asked once and dropped; the honest donor gave everything
    assert got.payload == PAYLOAD and got.bytes_by_donor["aggregator"] == len(PAYLOAD)
    assert sorted(asked) == ["fake-1", "fake-2"]
    assert set(got.dropped) == {"fake-1", "fake-2"} and "sent no chunk within" in got.dropped["fake-1"]
    assert not got.refuted
