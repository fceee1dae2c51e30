"""The peer's side of the aggregator streams: download the state, submit an update, fetch an aggregate.

The state comes as a manifest from an aggregator and chunks from any holder of it (`fetch_chunk` works
on a link to a peer as well as to an aggregator: both serve potluck.chunk).

Each call opens a fresh libp2p stream, sends one frame, reads one bounded reply frame and closes the
stream. Every failure is one of two kinds, because the peer's loop treats them differently:
`AggregatorRefused` (the aggregator answered, and said no: the message is its reason) and
`AggregatorUnreachable` (no answer: the stream would not open, broke, or timed out; or the aggregator
said it is busy; retry later). Both carry the refusal's `code` (RefusalCode.UNSPECIFIED where no
refusal came back): callers branch on it, never on the message.
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from potluck.errors import PotluckError
from potluck.protocol.envelope import (
    MAX_AGGREGATE_ENVELOPE_BYTES,
    MAX_RECEIPT_ENVELOPE_BYTES,
    MAX_STATE_ENVELOPE_BYTES,
    EnvelopeError,
    SignedAggregate,
    SignedReceipt,
    SignedState,
    SignedUpdate,
)
from potluck.protocol.messages import (
    AGGREGATE_HANDLER,
    CHUNK_HANDLER,
    MANIFEST_HANDLER,
    RECEIPT_HANDLER,
    STATE_HANDLER,
    SUBMIT_HANDLER,
    MessageError,
    aggregate_request,
    pack_envelope,
    receipt_request,
    state_request,
    unpack_envelope,
)
from potluck.protocol.state_chunks import MAX_CHUNK_BYTES, ChunkRequest, max_digest_bytes
from potluck.protocol.wire import (
    HEADER_BYTES,
    MessageKind,
    PeerRefusedError,
    RefusalCode,
    WireError,
    read_frame_from_stream,
    write_frame,
)

# A state download may be a whole model: 8 GiB covers 1B parameters with their outer momentum.
DEFAULT_MAX_STATE_BYTES = 8 * 2**30
MAX_AGGREGATE_BYTES = 2**30


class LinkError(PotluckError):
    """A call on an AggregatorLink failed; `code` is why the other side refused it (UNSPECIFIED: no refusal)."""

    def __init__(self, message: str, *, code: RefusalCode = RefusalCode.UNSPECIFIED) -> None:
        super().__init__(message)
        self.code = code


class AggregatorRefused(LinkError):
    """The aggregator answered with a refusal; the message is its one-line reason, `code` what it means."""


class AggregatorUnreachable(LinkError):
    """No usable answer from the aggregator (stream failed or timed out, or it is busy: code BUSY); worth retrying."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Transfer:
    """One call's reply and its timing."""

    body: bytes
    sent_bytes: int
    wait_s: float  # from sending the request to the first reply byte (includes a long-poll's waiting)
    transfer_s: float  # from the first reply byte to the last


class _TimedReader:
    """Wraps a stream reader to note when the first reply byte arrived."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.first_byte_at: float | None = None

    async def readexactly(self, n: int) -> bytes:
        data = await self.reader.readexactly(n)
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
        return data


class AggregatorLink:
    """Calls to one aggregator's stream handlers over this node's P2P."""

    def __init__(self, p2p: Any, peer_id: Any, *, max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> None:
        self.p2p = p2p
        self.peer_id = peer_id
        self.max_state_bytes = max_state_bytes

    async def _call(
        self,
        handler: str,
        *,
        kind: MessageKind,
        body: bytes,
        reply: MessageKind,
        max_reply_bytes: int,
        timeout_s: float,
    ) -> Transfer:
        started = time.perf_counter()
        try:
            _, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.peer_id, handler),
                timeout=min(timeout_s, 30),
            )
        except (TimeoutError, asyncio.TimeoutError) as e:
            raise AggregatorUnreachable(f"{handler}: no stream within {min(timeout_s, 30):.0f} s") from e
        except Exception as e:  # hivemind raises P2PDaemonError / P2PHandlerError / ConnectionError
            raise AggregatorUnreachable(f"{handler}: {_line(e)}") from e
        timed = _TimedReader(reader)
        unsent: BaseException | None = None
        try:
            try:
                await asyncio.wait_for(write_frame(writer, kind=kind, body=body), timeout=timeout_s)  # a stuck reader
            except (TimeoutError, asyncio.TimeoutError):
                raise  # an OSError too, but no refusal is waiting behind it
            except (ConnectionError, OSError) as e:  # refused after our head (busy): its answer may be waiting
                unsent = e
            # _TimedReader has the two reads a StreamReader offers that the frame reader uses, not its type
            frame = read_frame_from_stream(timed, max_body_bytes=max_reply_bytes, expected_kinds={reply})  # type: ignore[arg-type]
            _, reply_body = await asyncio.wait_for(frame, timeout=timeout_s if unsent is None else min(timeout_s, 10))
        except PeerRefusedError as e:
            if e.code is RefusalCode.BUSY:
                raise AggregatorUnreachable(f"{handler}: {e.reason}", code=e.code) from e
            raise AggregatorRefused(e.reason, code=e.code) from e
        except WireError as e:
            raise AggregatorUnreachable(f"{handler}: {_line(unsent) if unsent else e}") from e
        except (TimeoutError, asyncio.TimeoutError) as e:
            raise AggregatorUnreachable(f"{handler}: no reply within {timeout_s:.0f} s") from e
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            raise AggregatorUnreachable(f"{handler}: {_line(e)}") from e
        finally:
            writer.close()
        done = time.perf_counter()
        first = timed.first_byte_at or done
        return Transfer(
            body=reply_body, sent_bytes=HEADER_BYTES + len(body), wait_s=first - started, transfer_s=done - first
        )

    async def fetch_state(
        self, public_key: bytes, *, timeout_s: float = 300, client_mode: bool | None = None
    ) -> tuple[SignedState, bytes, Transfer]:
        """The aggregator's signed state (unverified: the caller checks it against the run's keys)."""
        t = await self._call(
            STATE_HANDLER,
            kind=MessageKind.STATE_REQUEST,
            body=state_request(public_key, client_mode=client_mode),
            reply=MessageKind.STATE,
            max_reply_bytes=self.max_state_bytes,
            timeout_s=timeout_s,
        )
        envelope, payload = _unpack(t.body, MAX_STATE_ENVELOPE_BYTES)
        return _parse(SignedState, envelope), payload, t

    async def fetch_manifest(
        self, public_key: bytes, *, timeout_s: float = 300, client_mode: bool | None = None
    ) -> tuple[SignedState, bytes, Transfer]:
        """The aggregator's signed state header and the chunk digests, both unchecked (state_chunks.check_manifest)."""
        t = await self._call(
            MANIFEST_HANDLER,
            kind=MessageKind.MANIFEST_REQUEST,
            body=state_request(public_key, client_mode=client_mode),
            reply=MessageKind.MANIFEST,
            max_reply_bytes=4 + MAX_STATE_ENVELOPE_BYTES + max_digest_bytes(self.max_state_bytes),
            timeout_s=timeout_s,
        )
        envelope, digest_bytes = _unpack(t.body, MAX_STATE_ENVELOPE_BYTES)
        signed = _parse(SignedState, envelope)
        if signed.header.payload_bytes > self.max_state_bytes:
            raise AggregatorRefused(
                f"its state is {signed.header.payload_bytes} bytes, over this peer's {self.max_state_bytes}-byte limit"
            )
        return signed, digest_bytes, t

    async def fetch_chunk(self, request: ChunkRequest, *, timeout_s: float = 60) -> tuple[bytes, Transfer]:
        """One chunk of a state from whoever this link reaches (unchecked: the caller checks its digest)."""
        t = await self._call(
            CHUNK_HANDLER,
            kind=MessageKind.CHUNK_REQUEST,
            body=request.to_bytes(),
            reply=MessageKind.CHUNK,
            max_reply_bytes=min(request.chunk_bytes, MAX_CHUNK_BYTES),
            timeout_s=timeout_s,
        )
        return t.body, t

    async def submit(
        self, update: SignedUpdate, payload: bytes, *, timeout_s: float = 120
    ) -> tuple[SignedReceipt, Transfer]:
        """Upload one update; the aggregator's signed receipt says whether it was accepted and why not."""
        t = await self._call(
            SUBMIT_HANDLER,
            kind=MessageKind.SUBMIT,
            body=pack_envelope(update.to_bytes(), payload),
            reply=MessageKind.SUBMIT_REPLY,
            max_reply_bytes=MAX_RECEIPT_ENVELOPE_BYTES,
            timeout_s=timeout_s,
        )
        return _parse(SignedReceipt, t.body), t

    async def fetch_aggregate(self, round_index: int, *, timeout_s: float) -> tuple[SignedAggregate, bytes, Transfer]:
        """Round `round_index`'s signed aggregate, waiting (long-poll) until that round closes."""
        t = await self._call(
            AGGREGATE_HANDLER,
            kind=MessageKind.AGGREGATE_REQUEST,
            body=aggregate_request(round_index),
            reply=MessageKind.AGGREGATE,
            max_reply_bytes=MAX_AGGREGATE_BYTES,
            timeout_s=timeout_s,
        )
        envelope, payload = _unpack(t.body, MAX_AGGREGATE_ENVELOPE_BYTES)
        return _parse(SignedAggregate, envelope), payload, t

    async def fetch_receipt(
        self, round_index: int, update_digest: bytes, *, timeout_s: float = 30
    ) -> tuple[SignedReceipt, Transfer]:
        """The final receipt of one update in a closed round (unverified: the caller checks it)."""
        t = await self._call(
            RECEIPT_HANDLER,
            kind=MessageKind.RECEIPT_REQUEST,
            body=receipt_request(round_index, update_digest),
            reply=MessageKind.RECEIPT,
            max_reply_bytes=MAX_RECEIPT_ENVELOPE_BYTES,
            timeout_s=timeout_s,
        )
        return _parse(SignedReceipt, t.body), t


def _unpack(body: bytes, max_envelope_bytes: int) -> tuple[bytes, bytes]:
    try:
        return unpack_envelope(body, max_envelope_bytes=max_envelope_bytes)
    except MessageError as e:
        raise AggregatorRefused(f"malformed reply: {e}") from e


_Reply = TypeVar("_Reply", SignedState, SignedAggregate, SignedReceipt)


def _parse(cls: type[_Reply], envelope: bytes) -> _Reply:
    """The signed message `envelope` holds, parsed (not verified); a malformed one is the aggregator's refusal."""
    try:
        return cls.from_bytes(envelope)
    except EnvelopeError as e:
        raise AggregatorRefused(f"malformed reply: {e}") from e


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
