"""An aggregator driven in process: its real handlers fed from memory, no node and no network."""

import asyncio
from pathlib import Path
from typing import Any

from potluck.aggregator_server.server import AggregatorServer, ServerOptions
from potluck.protocol.config import RunConfig
from potluck.protocol.envelope import (
    MAX_AGGREGATE_ENVELOPE_BYTES,
    MAX_RECEIPT_ENVELOPE_BYTES,
    MAX_STATE_ENVELOPE_BYTES,
    SignedAggregate,
    SignedReceipt,
    SignedState,
    SignedUpdate,
)
from potluck.protocol.identity import Identity, generate_identity
from potluck.protocol.messages import SUBMIT_HANDLER, pack_envelope, unpack_envelope
from potluck.protocol.wire import MessageKind, frame_chunks, read_frame_from_stream
from tests.integration.swarm_helpers import signed_test_update

AGGREGATOR = generate_identity()


class _Writer:
    """What a handler writes to, kept for the test to read back."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_server(tmp_path: Path, **overrides: Any) -> AggregatorServer:
    """An aggregator for a short run on a small corpus, with `overrides` (dotted RunConfig keys)."""
    cfg = RunConfig().with_overrides({"rounds": 4, "data.max_bytes": 200_000, **overrides}, source="test")
    return AggregatorServer(
        cfg, AGGREGATOR, ServerOptions(state_dir=tmp_path, eval_batches=1), on_event=lambda e: None
    )


async def submit(server: AggregatorServer, update: SignedUpdate, payload: bytes) -> SignedReceipt:
    """Upload through the real submit stream handler; the receipt it replies with."""
    reader = asyncio.StreamReader()
    for chunk in frame_chunks(MessageKind.SUBMIT, pack_envelope(update.to_bytes(), payload)):
        reader.feed_data(bytes(chunk))
    reader.feed_eof()
    writer = _Writer()
    await server.handlers.serving(SUBMIT_HANDLER)(None, reader, writer)  # type: ignore[arg-type]
    replies = asyncio.StreamReader()
    replies.feed_data(bytes(writer.data))
    replies.feed_eof()
    _, body = await read_frame_from_stream(
        replies, max_body_bytes=MAX_RECEIPT_ENVELOPE_BYTES, expected_kinds={MessageKind.SUBMIT_REPLY}
    )
    return SignedReceipt.from_bytes(body)


async def state(server: AggregatorServer) -> tuple[SignedState, bytes]:
    """The signed state the server hands a joiner now, and its payload."""
    envelope, payload = unpack_envelope(
        (await server.served_state()).state_body(), max_envelope_bytes=MAX_STATE_ENVELOPE_BYTES
    )
    return SignedState.from_bytes(envelope), payload


async def closed_round_0(
    server: AggregatorServer, peers: list[Identity]
) -> tuple[SignedState, bytes, SignedAggregate, bytes]:
    """Round 0 closed with one update from each of `peers`: its state, payload, signed aggregate and payload."""
    signed_state, state_payload = await state(server)
    for seed, peer in enumerate(peers):
        await submit(server, *signed_test_update(signed_state, state_payload, sender=peer, tokens=4_000, seed=seed))
    await server.close("all-reported")
    server.ledger.close()
    envelope, payload = unpack_envelope(aggregate_body(server, 0), max_envelope_bytes=MAX_AGGREGATE_ENVELOPE_BYTES)
    return signed_state, state_payload, SignedAggregate.from_bytes(envelope), payload


def aggregate_body(server: AggregatorServer, round_index: int) -> bytes:
    """Round `round_index`'s AGGREGATE body as the server still holds it."""
    body = server.keeper.closed.aggregate(round_index)
    assert body is not None, f"round {round_index}'s aggregate is not held"
    return body
