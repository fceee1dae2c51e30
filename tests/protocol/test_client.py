"""How the peer's aggregator client sorts replies: a refusal is final, a busy answer or silence is retried."""

import asyncio

import pytest

from potluck.protocol.client import AggregatorLink, AggregatorRefused, AggregatorUnreachable
from potluck.protocol.messages import BUSY_PREFIX
from potluck.protocol.wire import MessageKind, RefusalCode, encode_frame, error_body


class _Writer:
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class _FakeP2P:
    """Answers every stream with the given bytes (or never opens one)."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply

    async def call_binary_stream_handler(self, peer_id: object, handler: str):  # noqa: ANN201
        if self.reply is None:
            raise ConnectionError("failed to dial: connection refused")
        reader = asyncio.StreamReader()
        reader.feed_data(self.reply)
        reader.feed_eof()
        return object(), reader, _Writer()


def _fetch(reply: bytes | None) -> None:
    link = AggregatorLink(_FakeP2P(reply), peer_id="aggregator")
    asyncio.run(link.fetch_aggregate(3, timeout_s=5))


def test_a_refusal_is_final_and_carries_the_reason_and_code() -> None:
    body = error_body("the aggregate of round 3 is no longer held", code=RefusalCode.NOT_HELD)
    with pytest.raises(AggregatorRefused, match="^the aggregate of round 3 is no longer held") as info:
        _fetch(encode_frame(MessageKind.ERROR, body))
    assert info.value.code is RefusalCode.NOT_HELD


def test_a_busy_aggregator_is_worth_retrying() -> None:
    body = error_body(f"{BUSY_PREFIX}32 uploads are already in progress", code=RefusalCode.BUSY)
    with pytest.raises(AggregatorUnreachable, match="uploads are already in progress") as info:
        _fetch(encode_frame(MessageKind.ERROR, body))
    assert info.value.code is RefusalCode.BUSY


@pytest.mark.parametrize(
    ("code", "text", "outcome"),
    [
        (RefusalCode.BUSY, "the aggregate of round 3 is no longer held", AggregatorUnreachable),
        (RefusalCode.NOT_HELD, f"{BUSY_PREFIX}32 uploads are already in progress", AggregatorRefused),
        (RefusalCode.RUN_FINISHED, "all good, carry on", AggregatorRefused),
    ],
)
def test_what_the_client_does_follows_the_code_not_the_text(
    code: RefusalCode, text: str, outcome: type[Exception]
) -> None:
    # Execute
    with pytest.raises(outcome) as info:
        _fetch(encode_frame(MessageKind.ERROR, error_body(text, code=code)))
    # Assert
    assert type(info.value) is outcome and info.value.code is code  # type: ignore[attr-defined]


def test_a_hostile_code_is_a_plain_refusal() -> None:
    with pytest.raises(AggregatorRefused) as info:
        _fetch(encode_frame(MessageKind.ERROR, b"\xfa" + f"{BUSY_PREFIX}really".encode()))
    assert info.value.code is RefusalCode.UNSPECIFIED


@pytest.mark.parametrize("reply", [None, b"", b"PLK\x01\x06" + (100).to_bytes(8, "big") + b"short"])
def test_no_stream_or_a_broken_reply_is_worth_retrying(reply: bytes | None) -> None:
    with pytest.raises(AggregatorUnreachable):
        _fetch(reply)


def test_a_busy_refusal_that_cut_the_upload_short_still_reaches_the_client() -> None:
    # Prepare: the aggregator read the head, answered BUSY and closed; the rest of the body cannot be sent
    class _Cut(_Writer):
        async def drain(self) -> None:
            raise ConnectionResetError("stream reset by the remote")

    class _CutP2P(_FakeP2P):
        async def call_binary_stream_handler(self, peer_id: object, handler: str):  # noqa: ANN201
            info, reader, _ = await super().call_binary_stream_handler(peer_id, handler)
            return info, reader, _Cut()

    body = error_body(f"{BUSY_PREFIX}you already have 2 uploads in progress here", code=RefusalCode.BUSY)
    link = AggregatorLink(_CutP2P(encode_frame(MessageKind.ERROR, body)), peer_id="aggregator")
    # Execute
    with pytest.raises(AggregatorUnreachable, match="2 uploads in progress") as info:
        asyncio.run(link.fetch_aggregate(3, timeout_s=5))
    # Assert: busy (back off and retry), not a broken link
    assert info.value.code is RefusalCode.BUSY
