"""The aggregator's stream handlers: frames in, the keeper's or the server's answer out, nothing decided here.

One handler per protocol request (protocol/messages.py): state, manifest, submit, aggregate, probe and
receipt. Each reads one bounded frame, hands its content to the round keeper (keeper.py) or the server,
and writes the reply frame. `closing` wraps each: a refusal or malformed input is answered with one
ERROR line, and the stream is always closed.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from potluck.aggregator_server.accounting import final_receipt
from potluck.aggregator_server.checkpoint import CheckpointError
from potluck.aggregator_server.keeper import Admission, Decision, Upload
from potluck.aggregator_server.probe_handler import PROBE_HANDLER, handle_probe
from potluck.errors import PotluckError
from potluck.protocol.envelope import MAX_UPDATE_ENVELOPE_BYTES, EnvelopeError, Receipt, SignedUpdate, sign_receipt
from potluck.protocol.messages import (
    AGGREGATE_HANDLER,
    BUSY_PREFIX,
    MANIFEST_HANDLER,
    MAX_REQUEST_BYTES,
    RECEIPT_HANDLER,
    STATE_HANDLER,
    SUBMIT_HANDLER,
    MessageError,
    parse_aggregate_request,
    parse_receipt_request,
    unpack_envelope,
)
from potluck.protocol.wire import (
    MessageKind,
    RefusalCode,
    VersionMismatchError,
    WireError,
    error_body,
    read_frame_from_stream,
    write_frame,
)

if TYPE_CHECKING:
    from potluck.aggregator_server.server import AggregatorServer

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 60.0  # a peer that goes silent mid-request loses its stream after this
MAX_UPLOADS = 32  # uploads read at once: bounds the memory hostile peers can pin (32 x max_update_bytes)
MAX_PROBES = 2  # concurrent doctor probes; more would let anyone eat the aggregator's bandwidth

Handler = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Refusal(PotluckError):
    """A request this server refuses; the code and the message go back to the caller in an ERROR frame."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refusal_code(e: Exception) -> RefusalCode:
    """The code an ERROR frame carries for an exception `closing` answers."""
    if isinstance(e, Refusal):
        return e.code
    if isinstance(e, VersionMismatchError):
        return RefusalCode.VERSION_MISMATCH
    if isinstance(e, (WireError, MessageError)):
        return RefusalCode.BAD_REQUEST
    return RefusalCode.INTERNAL  # a checkpoint this server cannot read or write


class StreamHandlers:
    """The server's protocol handlers; `register` serves them on a libp2p node."""

    def __init__(self, server: "AggregatorServer") -> None:
        self.server = server
        self._probes = asyncio.Semaphore(MAX_PROBES)
        self._uploads = asyncio.Semaphore(MAX_UPLOADS)

    async def register(self, p2p: Any) -> None:
        """Serve the protocol's requests (each through `closing`: one ERROR line for what it refuses)."""
        for name, handler in (
            (STATE_HANDLER, self.state),
            (MANIFEST_HANDLER, self.manifest),
            (SUBMIT_HANDLER, self.submit),
            (AGGREGATE_HANDLER, self.aggregate),
            (PROBE_HANDLER, self.probe),
            (RECEIPT_HANDLER, self.receipt),
        ):
            await p2p.add_binary_stream_handler(name, closing(name, handler))

    async def _reply(self, writer: asyncio.StreamWriter, kind: MessageKind, body: bytes) -> None:
        self.server.bytes_out += len(body)
        await write_frame(writer, kind=kind, body=body)

    async def probe(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The doctor's rate probe, at most MAX_PROBES at a time: each may cost 8 MiB each way."""
        if self._probes.locked():
            raise Refusal(
                RefusalCode.BUSY, f"{BUSY_PREFIX}measuring other peers' links; try potluck doctor again in a minute"
            )
        async with self._probes:
            await handle_probe(info, reader, writer)

    async def state(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The whole state in one reply (standbys follow this way; joiners use the manifest and chunks)."""
        _, body = await read(reader, MessageKind.STATE_REQUEST, MAX_REQUEST_BYTES)
        await self.server.admit(body)
        async with self.server.lock:
            reply = (await self.server.served_state()).state_body()
        await self._reply(writer, MessageKind.STATE, reply)

    async def manifest(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The signed state header and its chunk digests: a joiner then fetches the chunks from every holder."""
        _, body = await read(reader, MessageKind.MANIFEST_REQUEST, MAX_REQUEST_BYTES)
        await self.server.admit(body)
        async with self.server.lock:
            reply = (await self.server.served_state()).manifest_body()
        await self._reply(writer, MessageKind.MANIFEST, reply)

    async def submit(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An upload: read it (at most MAX_UPLOADS at a time), let the keeper decide, reply with a signed receipt."""
        server = self.server
        limit = 4 + MAX_UPDATE_ENVELOPE_BYTES + server.cfg.max_update_bytes
        if self._uploads.locked():
            raise Refusal(
                RefusalCode.BUSY, f"{BUSY_PREFIX}{MAX_UPLOADS} uploads are already in progress; retry in a few seconds"
            )
        async with self._uploads:  # each upload may hold max_update_bytes in memory until it is judged
            reading = time.monotonic()
            _, body = await read(reader, MessageKind.SUBMIT, limit)
            arrived = time.monotonic()
        server.bytes_in += len(body)
        received_s = time.time()
        envelope, payload = unpack_envelope(body, max_envelope_bytes=MAX_UPDATE_ENVELOPE_BYTES)
        try:
            update = SignedUpdate.from_bytes(envelope)
        except EnvelopeError as e:
            raise Refusal(RefusalCode.BAD_REQUEST, f"envelope: {e}") from e
        upload = Upload(
            update=update,
            envelope=envelope,
            payload=payload,
            received_s=received_s,
            upload_s=arrived - reading,
            arrived_at=arrived,
        )
        keeper = server.keeper
        async with server.lock:
            step = keeper.screen(upload)
            if isinstance(step, Admission):  # decoding and spooling are the heavy part: off the event loop
                step = keeper.admit(step, await asyncio.to_thread(keeper.prepare, step))
            decision: Decision = step
            if decision.changed:
                server.wake()
        await self._reply(writer, MessageKind.SUBMIT_REPLY, self._receipt(update, decision))

    def _receipt(self, update: SignedUpdate, decision: Decision) -> bytes:
        """The signed receipt that answers `update` with the keeper's `decision`."""
        h, server = update.header, self.server
        receipt = Receipt(
            run_id=server.cfg.run_name,
            config_hash=server.cfg.config_hash,
            round=decision.round,
            peer_public_key=h.peer_public_key,
            aggregator_public_key=server.identity.public_key,
            update_sha256=h.digest(),
            tokens_credited=decision.credited,
            accepted=decision.accepted,
            reason="" if decision.rejection is None else _printable(str(decision.rejection))[:500],
            timestamp_s=time.time(),
        )
        return sign_receipt(receipt, server.identity).to_bytes()

    async def aggregate(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Round r's aggregate: held, or (r open) sent when r closes; refused if r is not open yet or too old."""
        server = self.server
        _, body = await read(reader, MessageKind.AGGREGATE_REQUEST, MAX_REQUEST_BYTES)
        wanted = parse_aggregate_request(body)
        if wanted > server.current.index:
            raise Refusal(
                RefusalCode.NOT_STARTED, f"round {wanted} has not started; the open round is {server.current.index}"
            )
        if wanted == server.current.index and not server.keeper.finished:
            timeout_s = max(server.current.seconds_left(), 0) + server.cfg.round_deadline_s + 30
            if not await server.published(wanted, timeout_s=timeout_s):
                raise Refusal(RefusalCode.ROUND_OPEN, f"round {wanted} is still open; ask again")
        aggregate = server.keeper.closed.aggregate(wanted)
        if aggregate is None:
            raise Refusal(
                RefusalCode.NOT_HELD,
                f"the aggregate of round {wanted} is no longer held (open round: {server.current.index}); "
                "download the state again",
            )
        await self._reply(writer, MessageKind.AGGREGATE, aggregate)
        server.fetches[wanted] = server.fetches.get(wanted, 0) + 1
        server.wake()

    async def receipt(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A closed round's final receipt for one update, built from its ledger rows (with the Merkle proof)."""
        server = self.server
        _, body = await read(reader, MessageKind.RECEIPT_REQUEST, MAX_REQUEST_BYTES)
        round_index, digest = parse_receipt_request(body)
        if round_index >= server.master.round:
            raise Refusal(
                RefusalCode.ROUND_OPEN,
                f"round {round_index} has not closed yet (the open round is {server.current.index})",
            )
        closed = server.keeper.closed.get(round_index)
        rows = None if closed is None else closed.rows
        if rows is None:
            rows = tuple(await asyncio.to_thread(server.ledger.rows, round_index=round_index))
        signed = final_receipt(
            list(rows),
            digest,
            run_id=server.cfg.run_name,
            config_hash=server.cfg.config_hash,
            identity=server.identity,
        )
        if signed is None:
            raise Refusal(RefusalCode.NOT_FOUND, f"round {round_index}'s ledger has no update {digest.hex()[:16]}")
        await self._reply(writer, MessageKind.RECEIPT, signed.to_bytes())
        server.receipts_served[round_index] = server.receipts_served.get(round_index, 0) + 1
        server.wake()


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


async def read(reader: asyncio.StreamReader, kind: MessageKind, max_body_bytes: int) -> tuple[MessageKind, bytes]:
    """One frame of `kind`, at most `max_body_bytes`, within READ_TIMEOUT_S."""
    return await asyncio.wait_for(
        read_frame_from_stream(reader, max_body_bytes=max_body_bytes, expected_kinds={kind}), READ_TIMEOUT_S
    )


def closing(name: str, handler: Handler) -> Handler:
    """Run a handler; answer refusals and malformed input with one ERROR line; always close the stream."""

    async def wrapped(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(info, reader, writer)
        except (Refusal, WireError, MessageError, CheckpointError) as e:
            logger.info("%s from %s refused: %s", name, getattr(info, "peer_id", "?"), e)
            reply = e.reply() if isinstance(e, VersionMismatchError) else str(e)
            with contextlib.suppress(Exception):
                await write_frame(writer, kind=MessageKind.ERROR, body=error_body(reply, code=_refusal_code(e)))
        except (TimeoutError, asyncio.TimeoutError):
            logger.info("%s from %s timed out", name, getattr(info, "peer_id", "?"))
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("%s: connection lost: %s", name, e)
        except Exception:
            logger.exception("%s handler failed", name)
            with contextlib.suppress(Exception):
                body = error_body("internal error on the aggregator", code=RefusalCode.INTERNAL)
                await write_frame(writer, kind=MessageKind.ERROR, body=body)
        finally:
            writer.close()

    return wrapped
