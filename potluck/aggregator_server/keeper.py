"""The round keeper: every decision about the open round, as plain calls with no streams and no DHT.

The stream handlers (handlers.py) read a frame, decode its envelope and hand the upload here; the keeper
answers with a `Decision` (accepted with the tokens credited, or refused with a reason code and text,
late or not) and keeps the open round (rounds.py), the window of closed rounds (closed_rounds.py), the
reputation's strikes and the spool. `close` judges the open round, records it in the ledger, computes
and checkpoints the next master state (in that order), and only then makes it current: it returns the
`RoundClose` that the server publishes. Time comes from the `clock` given (Unix seconds) and the
monotonic clock of rounds.py, so tests drive the keeper with plain values.

An upload's admission ladder (`screen`), first match wins:

1. the same update was refused before this round (a retry after a lost reply): the same answer, no strike;
2. its key is banned: refused without checking its signature or decoding it;
3. it was accepted into a round that has closed since (its receipt was lost): credited again;
4. the run has finished: refused;
5. the envelope checks (validation.py) against the open round; an update for the round before may then
   count late, at the run's discount (RunConfig.late_updates);
6. the same update already accepted: credited again; else it is decoded and spooled (`prepare`, the
   heavy part, which the server runs in a worker thread) and accepted (`admit`).
"""

import contextlib
import logging
import time
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from potluck.aggregator_server.accounting import refused_entry
from potluck.aggregator_server.attendance import Attendance
from potluck.aggregator_server.checkpoint import Checkpoint, load_spool, prune_spool, save_checkpoint, spool_update
from potluck.aggregator_server.closed_rounds import ClosedRound, ClosedRounds
from potluck.aggregator_server.closing import Closer, Deferred, RoundClose
from potluck.aggregator_server.master import MasterState, token_cap
from potluck.aggregator_server.members import Members
from potluck.aggregator_server.reputation import BanFileError, Reputation
from potluck.aggregator_server.rounds import Accepted, OpenRound
from potluck.aggregator_server.strike_policy import NoiseFilter
from potluck.aggregator_server.validation import (
    Rejection,
    RoundContext,
    check_envelope,
    check_signature,
    decode_update,
)
from potluck.events import Banned, Event, UpdateReceived, UpdateRejected
from potluck.incentives.ledger import Ledger
from potluck.protocol.codecs import Codec
from potluck.protocol.config import RunConfig
from potluck.protocol.density import round_codecs
from potluck.protocol.envelope import MAX_UPDATE_ENVELOPE_BYTES, EnvelopeError, SignedUpdate
from potluck.protocol.identity import Identity, fingerprint
from potluck.tasks.held_out import HeldOutLoss

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Upload:
    """An upload as read off a stream: the parsed signed update and its payload, with when it came."""

    update: SignedUpdate
    envelope: bytes  # the update's wire bytes, spooled as received
    payload: bytes
    received_s: float | None = None  # Unix time it was read (None: the keeper's clock now)
    upload_s: float = 0.0  # seconds spent reading it (0.0: not timed)
    arrived_at: float | None = None  # time.monotonic() when it was read, for its round's cycle (None: not timed)


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """The keeper's answer to one upload: what its receipt says."""

    rejection: Rejection | None  # None: accepted (its `check` is the reason code, str() the text)
    credited: int  # tokens credited (0 when refused)
    round: int  # the round the receipt names: the open one for a late update taken, else the update's own
    late: bool = False  # taken (or judged) as a late update for the round before
    changed: bool = False  # the open round changed: the round loop should look again

    @property
    def accepted(self) -> bool:
        """Whether the update counts (or counted) in a round."""
        return self.rejection is None


@dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
    """An upload that passed every check short of decoding: `prepare` and `admit` finish it."""

    upload: Upload
    late: bool
    codec: Codec  # the codec it was encoded with (the round before's, for a late update)
    spool_round: int  # the round it counts in, whose spool it goes to
    spec: dict[str, tuple[int, ...]]


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    """An admitted upload's payload, decoded (and then spooled), or why it does not decode."""

    decoded: dict[str, torch.Tensor] | None
    rejection: Rejection | None


class RoundKeeper:
    """The open round, the closed-round window and the run's strikes; see the module docstring."""

    def __init__(
        self,
        cfg: RunConfig,
        identity: Identity,
        master: MasterState,
        *,
        state_dir: Path,
        ledger: Ledger,
        reputation: Reputation,
        scorer: HeldOutLoss | None,
        on_event: Callable[[Event], None],
        closed: ClosedRounds | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.state_dir = state_dir
        self.ledger = ledger
        self.reputation = reputation
        self.noise = NoiseFilter.for_run(cfg)  # which round-close rejections are beyond chance (strike_policy.py)
        self.on_event = on_event
        self.clock = clock
        self.cap = token_cap(cfg)
        self.master = master
        self.codec, self.aggregate_codec = round_codecs(cfg, master.density)  # the open round's
        # the round before's upload codec, for its late updates; after a restart, the open round's (a late
        # update spooled before the restart at another density is skipped when it is restored)
        self.late_codec = self.codec
        self.current = OpenRound(
            index=master.round, deadline_s=cfg.round_deadline_s, target_tokens=cfg.target_tokens_per_round
        )
        self.closed = ClosedRounds() if closed is None else closed
        self.attendance = Attendance.from_ledger(ledger, round_index=master.round)  # whom rounds wait for
        self.current.expected = self.attendance.expected(master.round)
        self.rounds_closed = 0
        self.finished = False
        self.closer = Closer(self, scorer=scorer)
        self.members = Members(ledger.accepted_counts())  # only a member's refusals leave a record (members.py)

    # ----------------------------------------------------------------- uploads

    def submit(self, upload: Upload) -> Decision:
        """Decide on one upload in one call: `screen`, then `prepare` and `admit` what passes it."""
        step = self.screen(upload)
        if isinstance(step, Decision):
            return step
        return self.admit(step, self.prepare(step))

    def screen(self, upload: Upload) -> Decision | Admission:
        """Every check short of decoding (the ladder in the module docstring): a decision, or an admission."""
        update, payload = upload.update, upload.payload
        h = update.header
        rejection: Rejection | None = None
        credited = 0
        earlier = self.closed.credited(h.round, h.digest())
        if earlier is not None and check_signature(update, payload, self.context()) is not None:
            earlier = None  # not the update we accepted: judge it like any other
        self.reputation.reload_if_changed()
        repeated = self.current.answered.get(h.digest())
        if repeated is not None and check_signature(update, payload, self.context()) is not None:
            repeated = None  # not the update that was refused: judge it like any other
        if repeated is not None:  # refused before; the peer never saw the reply: the same answer, no new strike
            rejection = repeated
        elif self.reputation.is_banned(h.peer_public_key):  # first and cheap: no signature check, no decode
            who = fingerprint(h.peer_public_key)
            rejection = Rejection(check="banned", detail=f"{who} is banned from this run")
        elif earlier is not None:  # accepted before its round closed; the peer never saw the receipt
            credited = earlier
        elif self.finished:
            rejection = Rejection(check="finished", detail=f"the run has finished at round {self.master.round}")
        else:
            rejection = check_envelope(update, payload, self.context())
        late = rejection is not None and rejection.check == "round" and repeated is None
        late = late and self.takes_late(update)
        if late:
            rejection = check_envelope(update, payload, self.context(late=True))
        if earlier is None and rejection is None and not self.reputation.is_banned(h.peer_public_key):
            existing = self.current.accepted.get(h.peer_public_key)
            if existing is not None:  # the same update again: a retry after a lost reply
                credited = int(existing.weight)
            else:
                return Admission(
                    upload=upload,
                    late=late,
                    codec=self.upload_codec(late),
                    spool_round=self.current.index,  # a late update is restored into the round it counts in
                    spec=self.master.spec,
                )
        return self._decide(upload, rejection, credited=credited, late=late, repeated=repeated is not None)

    def prepare(self, admission: Admission) -> Prepared:
        """Decode an admitted upload and spool it if it decodes (before its receipt can go out).

        Reads nothing the keeper changes, so the server runs it in a worker thread (under its lock).
        """
        upload = admission.upload
        decoded, rejection = decode_update(upload.payload, codec=admission.codec, spec=admission.spec)
        if decoded is not None:
            spool_update(
                self.state_dir,
                round=admission.spool_round,
                public_key=upload.update.header.peer_public_key,
                envelope=upload.envelope,
                payload=upload.payload,
            )
        return Prepared(decoded=decoded, rejection=rejection)

    def admit(self, admission: Admission, prepared: Prepared) -> Decision:
        """Accept a prepared upload into the open round, or refuse it for its payload."""
        upload, credited = admission.upload, 0
        if prepared.decoded is not None:
            credited = self.accept(
                upload.update,
                upload.envelope,
                upload.payload,
                prepared.decoded,
                late=admission.late,
                upload_s=upload.upload_s,
                cycle_s=0.0 if upload.arrived_at is None else upload.arrived_at - self.current.opened_at,
            )
        return self._decide(
            upload,
            prepared.rejection,
            credited=credited,
            late=admission.late,
            repeated=False,
            taken=prepared.decoded is not None,
        )

    def _decide(
        self,
        upload: Upload,
        rejection: Rejection | None,
        *,
        credited: int,
        late: bool,
        repeated: bool,
        taken: bool = False,
    ) -> Decision:
        """Report the upload, book a refusal (ledger row, strike, whom the round waits for), and answer."""
        h = upload.update.header
        reported = rejection is None or self.members.reports(h.peer_public_key, rejection)
        if reported:
            self.on_event(
                UpdateReceived(
                    fingerprint=fingerprint(h.peer_public_key),
                    round=h.round,
                    tokens=h.tokens,
                    bytes=len(upload.payload),
                    accepted=rejection is None,
                    check=None if rejection is None else rejection.check,
                    time_s=self.clock() if upload.received_s is None else upload.received_s,
                )
            )
        changed = taken  # a new update in the round
        if rejection is not None and not repeated:
            self._book_refusal(upload, rejection, reported=reported)
            changed = True
        return Decision(
            rejection=rejection,
            credited=credited,
            round=self.current.index if late and rejection is None else h.round,  # where a late one counts
            late=late,
            changed=changed,
        )

    def _book_refusal(self, upload: Upload, rejection: Rejection, *, reported: bool) -> None:
        h = upload.update.header
        self.current.rejected += 1
        member = self.members.owns(h.peer_public_key, rejection)
        if member:  # signed by a member's key: the ledger records it (bounded per key and round: rounds.py)
            received_s = self.clock() if upload.received_s is None else upload.received_s
            entry = refused_entry(
                upload.update, payload_bytes=len(upload.payload), rejection=rejection, received_s=received_s
            )
            self.current.refuse(entry)
        else:
            self.members.strangers_refused += 1
        key = h.peer_public_key
        if rejection.check == "round" and h.round == self.current.index - 1:
            if self.attendance.may_wait_late(key, self.current.index):
                self.current.expected.add(key)  # a member, just slow: it trains this round now
            elif self.attendance.welcome(key):
                self.current.newcomers.add(key)  # a joiner, perhaps: waited for a little, once
        elif rejection.check not in ("signature", "banned") and h.round >= self.current.index:
            if key in self.current.expected or key in self.current.newcomers:  # only those the round waits for
                self.current.reported.add(key)  # it has had its say this round (one update a round)
        if reported:
            self.record_rejection(h.peer_public_key, h.round, rejection, upload.update)
        if member:
            self.current.remember_refusal(h.digest(), rejection)
        if self.reputation.is_banned(h.peer_public_key):
            self._forget(h.peer_public_key)  # never wait for a banned key

    def upload_codec(self, late: bool) -> Codec:
        """The codec an upload for the open round (or, `late`, for the round before) was encoded with."""
        return self.late_codec if late else self.codec

    def takes_late(self, update: SignedUpdate) -> bool:
        """Whether the run accepts this update, refused for its round, as a late one into the open round."""
        h = update.header
        held = self.current.accepted.get(h.peer_public_key)
        return (
            self.cfg.late_updates == "discount"
            and h.round == self.current.index - 1
            and (held is None or held.update.header.digest() == h.digest())  # free, or this one again (a retry)
        )

    def context(self, *, check_clock: bool = True, late: bool = False) -> RoundContext:
        """What an update for the open round is checked against; `late`: one for the round before it."""
        return RoundContext(
            run_id=self.cfg.run_name,
            config_hash=self.cfg.config_hash,
            round=self.current.index - late,
            version=self.master.version - late,
            codec=self.codec.name,
            max_update_bytes=self.cfg.max_update_bytes,
            accepted_digests={k: a.digest for k, a in self.current.accepted.items()},
            now_s=self.clock(),
            timestamp_window_s=self.cfg.validation.timestamp_window_s if check_clock else float("inf"),
            seen_nonces=ChainMap(
                {a.update.header.nonce: a.digest for a in self.current.accepted.values()}, *self.closed.nonce_maps()
            ),
            round_payloads={a.update.header.payload_sha256: k for k, a in self.current.accepted.items()},
            late_slots={k: a.update.header.round for k, a in self.current.accepted.items() if a.discount < 1},
        )

    def accept(
        self,
        update: SignedUpdate,
        envelope: bytes,
        payload: bytes,
        decoded: dict[str, torch.Tensor],
        *,
        late: bool = False,
        upload_s: float = 0.0,
        cycle_s: float = 0.0,
    ) -> int:
        """Put a decoded update into the open round (spooled already); the tokens it is credited."""
        key = update.header.peer_public_key
        discount = self.cfg.late_discount if late else 1.0
        weight = int(min(update.header.tokens, self.cap) * discount)
        self.current.accepted[key] = Accepted(
            update=update,
            envelope=envelope,
            payload=payload,
            decoded=decoded,
            weight=float(weight),
            discount=discount,
            upload_s=upload_s,
            cycle_s=cycle_s,
            received_s=self.clock(),
        )
        self.current.expected.add(key)
        self.members.add(key)
        return weight

    def record_rejection(
        self, public_key: bytes, round_index: int, rejection: Rejection, update: SignedUpdate | None = None
    ) -> None:
        """Log a rejection, report it (status line, swarm, and later the ledger); strike a member if it counts."""
        who = fingerprint(public_key)
        logger.warning("rejected update from %s for round %d: %s", who, round_index, rejection)
        self.on_event(
            UpdateRejected(
                fingerprint=who,
                round=round_index,
                check=rejection.check,
                reason=str(rejection),
                update=None if update is None else update.header.digest().hex()[:16],
            )
        )
        if not self.members.owns(public_key, rejection):
            return  # a stranger's failure says nothing of a volunteer's standing: no strike, no record
        if not self.noise.strikes(public_key, round_index=self.current.index, check=rejection.check):
            return  # a statistical outlier within what chance explains: dropped, not held against the key
        try:
            ban = self.reputation.strike(public_key, round_index=self.current.index, check=rejection.check)
        except BanFileError as e:
            logger.error("could not record a strike: %s", e)
            return
        if ban is not None:
            self.on_event(Banned(fingerprint=who, round=ban.round, reason=ban.reason))

    def restore_spool(self) -> int:
        """Accept again the open round's updates spooled before a restart; how many were restored."""
        max_bytes = MAX_UPDATE_ENVELOPE_BYTES + self.cfg.max_update_bytes
        restored = 0
        for envelope, payload in load_spool(self.state_dir, round=self.master.round, max_bytes=max_bytes):
            try:
                update = SignedUpdate.from_bytes(envelope)
            except EnvelopeError as e:
                logger.warning("skipping a spooled update: %s", e)
                continue
            # accepted before the crash: however long the aggregator was down, they were fresh then
            rejection = check_envelope(update, payload, self.context(check_clock=False))
            late = rejection is not None and self.takes_late(update)
            if late:
                rejection = check_envelope(update, payload, self.context(check_clock=False, late=True))
            decoded = None
            if rejection is None:
                decoded, rejection = decode_update(payload, codec=self.upload_codec(late), spec=self.master.spec)
            if rejection is not None or decoded is None:
                logger.warning("skipping a spooled update: %s", rejection)
                continue
            self.accept(update, envelope, payload, decoded, late=late)
            restored += 1
        if restored:
            logger.info("round %d: restored %d accepted update(s) from the spool", self.master.round, restored)
        return restored

    # ----------------------------------------------------------------- who the round waits for

    def join(self, public_key: bytes, *, wait_for_peers: int) -> bool:
        """A joiner downloads the state; True when the first round's wait for `wait_for_peers` is over.

        The request is unauthenticated: the open round waits for the joiner only while the run has no member
        yet (attendance.py). `wait_for_peers` is how many the first round waits for (ServerOptions); when
        the last of them comes, the round gets a full deadline from now.
        """
        if public_key in self.current.accepted:
            return False
        self.current.join(public_key)
        if self.attendance.waits_for_joiners(self.current.index):
            self.current.expected.add(public_key)
        if wait_for_peers and self.rounds_closed == 0 and len(self.current.arrived) == wait_for_peers:
            self.current.extend()  # everyone the first round waited for is here: give them a full deadline
            return True
        return False

    def ban(self, public_key: bytes, *, reason: str, issuer: bytes | None = None) -> int:
        """Ban a key now (persisted with the strikes) and stop waiting for it; the round the ban starts.

        `issuer`: the run's other aggregator the ban was learned from (None: this one's own).
        """
        ban = self.reputation.ban(public_key, reason=reason, issuer=issuer)
        self._forget(public_key)
        return ban.round

    def _forget(self, public_key: bytes) -> None:
        self.current.expected.discard(public_key)
        self.attendance.kept.pop(public_key, None)

    def known_keys(self) -> set[bytes]:
        """Every peer key this run has seen: banned, struck, waited for, contributing, or in the ledger."""
        keys = set(self.reputation.bans) | set(self.reputation.strikes)
        keys |= self.current.expected | set(self.current.accepted) | set(self.ledger.points())
        return keys

    # ----------------------------------------------------------------- close, follow, take over

    def close(self, reason: str) -> RoundClose | Deferred:
        """Close the open round (closing.py) and open the next: its `RoundClose`, or why it stays open for now.

        The round is recorded and checkpointed before anything here changes: only then does the new state
        become current (and visible to anyone the server serves).
        """
        closed = self.closer.close(reason)
        if isinstance(closed, Deferred):
            return closed
        self.master = closed.master
        self.late_codec = self.codec
        self.codec, self.aggregate_codec = round_codecs(self.cfg, closed.master.density)
        self.closed.add(closed.record)
        done = closed.round
        self.attendance.round_closed(done.index, waited=done.expected, reported=done.reported, kept=done.accepted)
        self.current = done.successor(expected=self.attendance.expected(done.index + 1))
        self.current.newcomers = done.dropped - self.current.expected  # signed, on time, decoded: work, perhaps
        self.rounds_closed += 1
        self.members.end_round(closed.round.index)
        with contextlib.suppress(OSError):
            prune_spool(self.state_dir, before_round=closed.master.round)
        return closed

    def evaluate(self, params: dict[str, torch.Tensor]) -> float | None:
        """The held-out loss of `params` (None for a shard's aggregator, which holds part of the model only)."""
        return self.closer.evaluate(params)

    def checkpoint(self, state: MasterState, aggregate_body: bytes | None) -> None:
        """Write `state` (and the aggregate that made it) to the state dir, durably."""
        save_checkpoint(
            self.state_dir,
            Checkpoint(
                round=state.round,
                version=state.version,
                params=state.params,
                outer_state=state.outer_state,
                residual=state.residual,
                last_aggregate=aggregate_body,
                config_hash=self.cfg.config_hash,
                density=state.density,
            ),
        )

    def followed(self, master: MasterState, aggregate: bytes | None) -> None:
        """A standby's new copy of the shard (checkpointed already) becomes current, with its aggregate."""
        self.master = master
        if aggregate is not None:
            self.closed.add(ClosedRound(index=master.round - 1, aggregate=aggregate))

    def take_over(self, master: MasterState, contributors: set[bytes]) -> None:
        """A standby's primary is gone: open `master`'s round, waiting for the peers alive a round ago."""
        self.master = master
        self.codec, self.aggregate_codec = round_codecs(self.cfg, master.density)
        self.late_codec = self.codec
        self.attendance.seed(master.round - 1, contributors)  # kept a round ago: members, alive then
        for key in contributors:  # in the primary's signed aggregate: it accepted their updates
            self.members.add(key)
        self.current = OpenRound(
            index=master.round,
            deadline_s=self.cfg.round_deadline_s,
            target_tokens=self.cfg.target_tokens_per_round,
            expected=self.attendance.expected(master.round),  # wait for them, not for the first to arrive
        )
