"""The aggregator's stream handlers: frames in, the keeper's or the server's answer out, nothing decided here.

One handler per protocol request (protocol/messages.py): state, manifest, submit, aggregate, probe and
receipt. Each gets one bounded request frame, hands its content to the round keeper (keeper.py) or the
server, and writes the reply frame. `closing` wraps each: a refusal or malformed input is answered with
one ERROR line, and the stream is always closed.

Before a handler runs, `StreamHandlers.serve` reads the request's head (within seconds), takes a slot
of the request's kind for the remote peer (protocol/limits.py: a few per peer, more in all; "busy" as a
BUSY refusal beyond), then reads the body under deadlines set by its declared size. Every reply is
written under deadlines too. A silent, slow or never-reading stream therefore holds only its own
peer's slots, for seconds, and every other peer is served as before.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from potluck.aggregator_server.accounting import RoundReceipts
from potluck.aggregator_server.checkpoint import CheckpointError
from potluck.aggregator_server.keeper import Admission, Decision, Upload
from potluck.aggregator_server.probe_handler import MAX_PROBE_BYTES, PROBE_HANDLER, answer_probe
from potluck.errors import PotluckError
from potluck.protocol.envelope import MAX_UPDATE_ENVELOPE_BYTES, EnvelopeError, Receipt, SignedUpdate, sign_receipt
from potluck.protocol.limits import Busy, StreamLimits, peer_of
from potluck.protocol.messages import (
    AGGREGATE_HANDLER,
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
    DEFAULT_DEADLINES,
    Deadlines,
    MessageKind,
    RefusalCode,
    VersionMismatchError,
    WireError,
    abort,
    error_body,
    read_frame_body,
    read_frame_head,
    write_frame,
)

if TYPE_CHECKING:
    from potluck.aggregator_server.server import AggregatorServer

logger = logging.getLogger(__name__)

# Slots per kind of request: (at once in all, at once per remote peer). The totals bound what the node
# holds (uploads pin up to max_update_bytes each until judged); the per-peer share, well under each total,
# is what one remote can take: an honest peer needs one or two of each at a time.
MAX_UPLOADS, UPLOADS_PER_PEER = 32, 2
# uploads read and waiting to be judged, per signing key whose signature holds (one key behind many peer ids)
MAX_JUDGING, UPLOADS_PER_KEY = 256, 2
MAX_PROBES, PROBES_PER_PEER = 2, 1  # each may cost 8 MiB each way
MAX_STATE_REQUESTS, STATE_REQUESTS_PER_PEER = 64, 2  # manifests and whole states
MAX_LONG_POLLS, LONG_POLLS_PER_PEER = 1024, 4  # aggregate requests waiting for their round to close: cheap
MAX_RECEIPT_REQUESTS, RECEIPT_REQUESTS_PER_PEER = 64, 4
# closed rounds whose rows stay indexed for final receipts (peers ask right after a close; older ones re-read)
RECEIPT_ROUNDS_INDEXED = 4
# streams whose request head has not arrived yet: beyond this they are closed unanswered (a flood)
MAX_WAITING_HEADS, WAITING_HEADS_PER_PEER = 512, 16

Handler = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """One request frame, read: who sent it, its body, and how long its body took to arrive."""

    info: object  # hivemind's StreamInfo
    peer: bytes | None  # the remote libp2p peer id
    body: bytes
    read_s: float
    arrived_at: float  # monotonic


RequestHandler = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True, kw_only=True, slots=True)
class Route:
    """One stream handler: the request kind it takes, its size limit, its slots, and what answers it."""

    name: str
    kind: MessageKind
    max_body_bytes: int
    limits: StreamLimits
    answer: RequestHandler
    slot_while_answering: bool = True  # False: the slot covers reading the body only (uploads: judging is queued)


class Flooded(PotluckError):
    """More streams of one peer wait for their request heads than it may open: closed, nothing answered."""


class Refusal(PotluckError):
    """A request this server refuses; the code and the message go back to the caller in an ERROR frame."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refusal_code(e: Exception) -> RefusalCode:
    """The code an ERROR frame carries for an exception `closing` answers."""
    if isinstance(e, Refusal):
        return e.code
    if isinstance(e, Busy):
        return RefusalCode.BUSY
    if isinstance(e, VersionMismatchError):
        return RefusalCode.VERSION_MISMATCH
    if isinstance(e, (WireError, MessageError)):
        return RefusalCode.BAD_REQUEST
    return RefusalCode.INTERNAL  # a checkpoint this server cannot read or write


class StreamHandlers:
    """The server's protocol handlers; `register` serves them on a libp2p node."""

    def __init__(self, server: "AggregatorServer", *, deadlines: Deadlines = DEFAULT_DEADLINES) -> None:
        self.server = server
        self.deadlines = deadlines
        self.waiting = StreamLimits("streams", total=MAX_WAITING_HEADS, per_owner=WAITING_HEADS_PER_PEER)
        self.uploads = StreamLimits("uploads", total=MAX_UPLOADS, per_owner=UPLOADS_PER_PEER)
        self.upload_keys = StreamLimits("uploads", total=MAX_JUDGING, per_owner=UPLOADS_PER_KEY)
        self.probes = StreamLimits("probes", total=MAX_PROBES, per_owner=PROBES_PER_PEER)
        self.round_receipts: dict[int, RoundReceipts] = {}  # round -> its rows, indexed (the newest few)
        self.state_requests = StreamLimits(
            "state requests", total=MAX_STATE_REQUESTS, per_owner=STATE_REQUESTS_PER_PEER
        )
        self.long_polls = StreamLimits("aggregate requests", total=MAX_LONG_POLLS, per_owner=LONG_POLLS_PER_PEER)
        self.receipt_requests = StreamLimits(
            "receipt requests", total=MAX_RECEIPT_REQUESTS, per_owner=RECEIPT_REQUESTS_PER_PEER
        )

    def routes(self) -> list[Route]:
        """Every request this server answers, with its kind, size limit and slots."""
        upload_bytes = 4 + MAX_UPDATE_ENVELOPE_BYTES + self.server.cfg.max_update_bytes
        return [
            Route(
                name=STATE_HANDLER,
                kind=MessageKind.STATE_REQUEST,
                max_body_bytes=MAX_REQUEST_BYTES,
                limits=self.state_requests,
                answer=self.state,
            ),
            Route(
                name=MANIFEST_HANDLER,
                kind=MessageKind.MANIFEST_REQUEST,
                max_body_bytes=MAX_REQUEST_BYTES,
                limits=self.state_requests,
                answer=self.manifest,
            ),
            Route(
                name=SUBMIT_HANDLER,
                kind=MessageKind.SUBMIT,
                max_body_bytes=upload_bytes,
                limits=self.uploads,
                answer=self.submit,
                slot_while_answering=False,
            ),
            Route(
                name=AGGREGATE_HANDLER,
                kind=MessageKind.AGGREGATE_REQUEST,
                max_body_bytes=MAX_REQUEST_BYTES,
                limits=self.long_polls,
                answer=self.aggregate,
            ),
            Route(
                name=PROBE_HANDLER,
                kind=MessageKind.PROBE,
                max_body_bytes=MAX_PROBE_BYTES,
                limits=self.probes,
                answer=self.probe,
            ),
            Route(
                name=RECEIPT_HANDLER,
                kind=MessageKind.RECEIPT_REQUEST,
                max_body_bytes=MAX_REQUEST_BYTES,
                limits=self.receipt_requests,
                answer=self.receipt,
            ),
        ]

    async def register(self, p2p: Any) -> None:
        """Serve the protocol's requests (each through `closing`: one ERROR line for what it refuses)."""
        for route in self.routes():
            await p2p.add_binary_stream_handler(route.name, closing(route.name, self.serving(route), self.deadlines))

    def serving(self, route: Route | str) -> Handler:
        """The stream handler of `route` (or of the route named so), unwrapped: head, slot, body, then its answer.

        Its refusals are raised, not answered (`closing` answers them): tests drive it in process.
        """
        if isinstance(route, str):
            route = next(r for r in self.routes() if r.name == route)

        answer = route.answer

        async def serve(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = peer_of(info)
            expected = {route.kind}
            try:
                with self.waiting.slot(peer):
                    kind, size = await read_frame_head(
                        reader, max_body_bytes=route.max_body_bytes, expected_kinds=expected, deadlines=self.deadlines
                    )
            except Busy as e:
                raise Flooded(str(e)) from None
            with route.limits.slot(peer):  # Busy here is answered: the asker has sent its head and hears why
                reading = time.monotonic()
                _, body = await read_frame_body(reader, kind, size, expected_kinds=expected, deadlines=self.deadlines)
                arrived = time.monotonic()
                request = Request(info=info, peer=peer, body=body, read_s=arrived - reading, arrived_at=arrived)
                if route.slot_while_answering:
                    await answer(request, writer)
            if not route.slot_while_answering:
                await answer(request, writer)

        return serve

    async def _reply(self, writer: asyncio.StreamWriter, kind: MessageKind, body: bytes) -> None:
        self.server.bytes_out += len(body)
        await write_frame(writer, kind=kind, body=body, deadlines=self.deadlines)

    async def probe(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """The doctor's rate probe, at most MAX_PROBES at a time (one per peer): each may cost 8 MiB each way."""
        await answer_probe(getattr(request.info, "peer_id", "?"), request.body, writer, deadlines=self.deadlines)

    async def state(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """The whole state in one reply (standbys follow this way; joiners use the manifest and chunks)."""
        await self.server.admit(request.body)
        async with self.server.lock:
            reply = (await self.server.served_state()).state_body()
        await self._reply(writer, MessageKind.STATE, reply)

    async def manifest(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """The signed state header and its chunk digests: a joiner then fetches the chunks from every holder."""
        await self.server.admit(request.body)
        async with self.server.lock:
            reply = (await self.server.served_state()).manifest_body()
        await self._reply(writer, MessageKind.MANIFEST, reply)

    async def submit(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """An upload (read, at most MAX_UPLOADS at a time): let the keeper decide, reply with a signed receipt."""
        server, body = self.server, request.body
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
            upload_s=request.read_s,
            arrived_at=request.arrived_at,
        )
        # a key whose signature holds may have UPLOADS_PER_KEY uploads queued for judging, whatever its peer ids
        with self.upload_keys.slot(_verified_key(update)):
            decision = await self._judge(upload)
        await self._reply(writer, MessageKind.SUBMIT_REPLY, self._receipt(update, decision))

    async def _judge(self, upload: Upload) -> Decision:
        """The keeper's decision on an upload (decoding and spooling off the event loop), under the server's lock."""
        server, keeper = self.server, self.server.keeper
        async with server.lock:
            step = keeper.screen(upload)
            if isinstance(step, Admission):  # decoding and spooling are the heavy part: off the event loop
                step = keeper.admit(step, await asyncio.to_thread(keeper.prepare, step))
            decision: Decision = step
            if decision.changed:
                server.wake()
        return decision

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

    async def aggregate(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """Round r's aggregate: held, or (r open) sent when r closes; refused if r is not open yet or too old."""
        server = self.server
        wanted = parse_aggregate_request(request.body)
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

    async def receipt(self, request: Request, writer: asyncio.StreamWriter) -> None:
        """A closed round's final receipt for one update, built from its ledger rows (with the Merkle proof)."""
        server = self.server
        round_index, digest = parse_receipt_request(request.body)
        if round_index >= server.master.round:
            raise Refusal(
                RefusalCode.ROUND_OPEN,
                f"round {round_index} has not closed yet (the open round is {server.current.index})",
            )
        index = self.round_receipts.get(round_index)
        if index is None:
            closed = server.keeper.closed.get(round_index)
            rows = None if closed is None else closed.rows
            if rows is None:
                rows = tuple(await asyncio.to_thread(server.ledger.rows, round_index=round_index))
            index = self.round_receipts[round_index] = await asyncio.to_thread(RoundReceipts, rows)
            while len(self.round_receipts) > RECEIPT_ROUNDS_INDEXED:
                del self.round_receipts[min(self.round_receipts)]
        signed = index.receipt(
            digest, run_id=server.cfg.run_name, config_hash=server.cfg.config_hash, identity=server.identity
        )
        if signed is None:
            raise Refusal(RefusalCode.NOT_FOUND, f"round {round_index}'s ledger has no update {digest.hex()[:16]}")
        await self._reply(writer, MessageKind.RECEIPT, signed.to_bytes())
        server.receipts_served[round_index] = server.receipts_served.get(round_index, 0) + 1
        server.wake()


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _verified_key(update: SignedUpdate) -> bytes | None:
    """The upload's signing key if its header's signature holds (a claimed key counts for nobody), else None."""
    try:
        update.verify()
    except EnvelopeError:
        return None
    return update.header.peer_public_key


def closing(name: str, handler: Handler, deadlines: Deadlines = DEFAULT_DEADLINES) -> Handler:
    """Run a handler; answer refusals and malformed input with one ERROR line; always close the stream.

    A stream that timed out, or a flood's extra stream, is dropped without an answer (nothing would read it).
    """

    async def wrapped(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = getattr(info, "peer_id", "?")
        try:
            await handler(info, reader, writer)
        except Flooded as e:
            logger.debug("%s from %s closed unread: %s", name, peer, e)
            abort(writer)
        except (Refusal, Busy, WireError, MessageError, CheckpointError) as e:
            log = logger.debug if isinstance(e, Busy) else logger.info
            log("%s from %s refused: %s", name, peer, e)
            reply = e.reply() if isinstance(e, VersionMismatchError) else str(e)
            with contextlib.suppress(Exception):
                body = error_body(reply, code=_refusal_code(e))
                await write_frame(writer, kind=MessageKind.ERROR, body=body, deadlines=deadlines)
        except (TimeoutError, asyncio.TimeoutError):
            logger.info("%s from %s timed out", name, peer)
            abort(writer)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("%s: connection lost: %s", name, e)
        except Exception:
            logger.exception("%s handler failed", name)
            with contextlib.suppress(Exception):
                body = error_body("internal error on the aggregator", code=RefusalCode.INTERNAL)
                await write_frame(writer, kind=MessageKind.ERROR, body=body, deadlines=deadlines)
        finally:
            writer.close()

    return wrapped
