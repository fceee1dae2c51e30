"""Closing the open round: judge it, record it in the ledger, compute and checkpoint the next state.

The durable part of the keeper's `close`, in the order that makes a crash at any point recoverable:
the round's ledger rows are committed first, then the next master state is checkpointed; only after
both does the keeper make the new state current and the server publish its aggregate. A restart on
the same state dir whose ledger already holds the open round (the process died between the two
writes) closes it again exactly as the ledger recorded it, not judged anew.
"""

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from potluck.aggregator_server.accounting import HISTORY_ROUNDS, refused_entry, round_entries
from potluck.aggregator_server.checkpoint import CheckpointError
from potluck.aggregator_server.closed_rounds import ClosedRound
from potluck.aggregator_server.judge import judge_round
from potluck.aggregator_server.master import Contribution, MasterState, close_round
from potluck.aggregator_server.next_density import UploadTiming, next_density
from potluck.aggregator_server.rounds import OpenRound
from potluck.aggregator_server.setup import SetupError
from potluck.events import RoundError
from potluck.incentives.ledger import LedgerError
from potluck.incentives.ledger_format import LedgerRow, SignedHead
from potluck.protocol.density import density_ladder
from potluck.protocol.envelope import SignedAggregate
from potluck.protocol.messages import pack_envelope
from potluck.tasks.held_out import HeldOutLoss

if TYPE_CHECKING:
    from potluck.aggregator_server.keeper import RoundKeeper

logger = logging.getLogger(__name__)

RETRY_S = 5.0  # after a failed ledger or checkpoint write, before the round is closed again


@dataclass(frozen=True, kw_only=True, slots=True)
class Deferred:
    """The round stays open: nothing was kept, or a write failed (nothing of the round changed then)."""

    retry_after_s: float  # wait this long before trying again (0: when the round loop next sees a reason)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundClose:
    """A closed round, recorded and checkpointed: what the server publishes and reports."""

    reason: str  # what closed it ("tokens", "all-reported", "deadline", "admin")
    round: OpenRound  # the round as it closed (its accepted updates: the kept ones)
    record: ClosedRound  # what the window keeps of it
    signed: SignedAggregate  # its aggregate's signed header
    master: MasterState  # the state it produced
    head: SignedHead  # the ledger head after its rows
    kept: Mapping[bytes, LedgerRow]  # update digest -> the ledger row of each kept update
    density: float  # the round's upload density (the next one's is master.density)
    aggregation_s: float  # from the start of the close to the checkpoint


class Closer:
    """Judges, records and checkpoints the keeper's open round; the keeper then makes the result current."""

    def __init__(self, keeper: "RoundKeeper", *, scorer: HeldOutLoss | None) -> None:
        self.keeper = keeper
        # A shard's aggregator holds part of the model: it cannot score the held-out loss (peers can, see
        # PeerOptions.eval_batches), so its rounds skip the held-out check and report no loss.
        self.scorer = scorer

    def close(self, reason: str) -> RoundClose | Deferred:
        """Close the keeper's open round: a `RoundClose` once recorded and checkpointed, else `Deferred`."""
        k = self.keeper
        started = time.perf_counter()
        closing = k.current
        head = k.ledger.head()
        if head is None or head.round != closing.index:
            judged = self._judge_and_record(closing)
            if isinstance(judged, Deferred):
                return judged
            head = judged
        else:
            logger.info("round %d: already in the ledger; closing it as recorded", closing.index)
        rows = k.ledger.rows(round_index=closing.index)
        kept = {r.entry.update_digest: r for r in rows if r.entry.accepted}
        for key, a in list(closing.accepted.items()):
            if a.digest not in kept:  # dropped by the round's checks (before a restart)
                del closing.accepted[key]
        contributions = [
            Contribution(
                public_key=key,
                decoded=a.decoded,
                tokens=int(kept[a.digest].entry.weight),
                update_digest=a.digest,
            )
            for key, a in sorted(closing.accepted.items())
        ]
        if len(contributions) != len(kept):
            raise SetupError(
                f"round {closing.index} is in the ledger with {len(kept)} accepted update(s) but only "
                f"{len(contributions)} are spooled in {k.state_dir}; the state dir is damaged"
            )
        timings = [
            UploadTiming(payload_bytes=len(a.payload), upload_s=a.upload_s, cycle_s=a.cycle_s)
            for a in closing.accepted.values()
            if a.discount == 1 and a.upload_s > 0
        ]
        density = next_density(k.master.density, timings, ladder=density_ladder(k.cfg))
        try:
            following, signed, payload = close_round(
                k.master,
                contributions,
                cfg=k.cfg,
                identity=k.identity,
                aggregate_codec=k.aggregate_codec,
                ledger_head=head.head_hash,
                next_density=density,
            )
            body = pack_envelope(signed.to_bytes(), payload)
            k.checkpoint(following, body)
        except CheckpointError as e:  # the ledger has the round: the retry closes it as recorded
            logger.error("round %d not closed: %s; retrying in 5 s", closing.index, e)
            k.on_event(RoundError(round=closing.index, detail=str(e)))
            return Deferred(retry_after_s=RETRY_S)
        credited = dict(signed.header.contributors)
        record = ClosedRound(
            index=closing.index,
            aggregate=body,
            credited={a.digest: credited[key] for key, a in closing.accepted.items()},
            nonces={a.update.header.nonce: a.digest for a in closing.accepted.values()},
            rows=tuple(rows),
        )
        return RoundClose(
            reason=reason,
            round=closing,
            record=record,
            signed=signed,
            master=following,
            head=head,
            kept=kept,
            density=k.master.density,
            aggregation_s=time.perf_counter() - started,
        )

    def _judge_and_record(self, closing: OpenRound) -> SignedHead | Deferred:
        """Judge the closing round and commit its ledger rows; `Deferred` if it cannot close yet (nothing kept,
        or the ledger write failed: nothing of the round changed then, the next attempt starts over)."""
        k = self.keeper
        entries = sorted(closing.accepted.items())
        verdict = judge_round(
            [a.decoded for _, a in entries],
            [a.claim for _, a in entries],
            cfg=k.cfg,
            token_cap=k.cap,
            held_out_loss=self._held_out_loss if self.scorer is not None else None,
        )
        head = None
        if verdict.kept:
            judged = round_entries(  # reads each kept peer's history from the ledger
                [a for _, a in entries],
                verdict,
                token_cap=k.cap,
                history=lambda key: k.ledger.recent_weights(key, limit=HISTORY_ROUNDS),
            )
            rows = sorted([*closing.refused, *judged], key=lambda e: e.time_s)  # in the order they arrived
            try:
                head = k.ledger.append_round(round_index=closing.index, entries=rows, identity=k.identity)
            except LedgerError as e:
                logger.error("round %d not closed: %s; retrying in 5 s", closing.index, e)
                k.on_event(RoundError(round=closing.index, detail=str(e)))
                return Deferred(retry_after_s=RETRY_S)
        for i, rejection in sorted(verdict.rejections.items()):
            key, a = entries[i]
            del closing.accepted[key]  # it does not count; the aggregate's contributor list says so
            closing.rejected += 1
            k.record_rejection(key, closing.index, rejection, a.update)
            if head is None:  # the round stays open: its row waits with the arrival refusals
                closing.refuse(
                    refused_entry(a.update, payload_bytes=len(a.payload), rejection=rejection, received_s=a.received_s)
                )
            closing.reported.add(key)  # it has had its say: a round left open does not wait for it again
            closing.dropped.add(key)
        if head is None:
            logger.warning("round %d: every update was dropped at close; waiting another deadline", closing.index)
            closing.extend()
            return Deferred(retry_after_s=0.0)
        return head

    def _held_out_loss(self, delta: Mapping[str, torch.Tensor] | None) -> float:
        """The held-out check's score: the base with `delta` applied alone (outer lr), on the check batches."""
        assert self.scorer is not None  # only called when this aggregator scores
        master, lr = self.keeper.master, self.keeper.cfg.outer.lr
        params = master.params if delta is None else {n: p - lr * delta[n] for n, p in master.params.items()}
        return self.scorer(params, first=self.keeper.cfg.validation.held_out_batches)

    def evaluate(self, params: dict[str, torch.Tensor]) -> float | None:
        """Held-out loss of `params` on all the scorer's batches; None for a shard's aggregator."""
        return None if self.scorer is None else self.scorer(params)
