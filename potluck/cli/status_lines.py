"""The one human line per node event that `potluck aggregator` and `potluck peer` print (or the JSON object).

Status goes to stdout, one line per event (or one JSON object per line with `--json`, which is what
`potluck swarm` reads); logs go to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from potluck.events import (
    AggregatorDone,
    AggregatorReady,
    DonorDropped,
    Event,
    Failover,
    Finished,
    Followed,
    Following,
    PeerDone,
    PeerPlan,
    PeerRound,
    PeerSynced,
    ReceiptInvalid,
    RoundClosed,
    RoundError,
    ServerlessReady,
    ServerlessRound,
    ServerlessSynced,
    StateRefused,
    StatusPage,
    Takeover,
    UpdateRejected,
    encode_event,
)
from potluck.planning.plan import AutoPlan


def _loss(value: object) -> str:
    """A held-out loss for a status line; a shard's aggregator has none (its peers score the model)."""
    return "n/a (sharded)" if value is None else f"{value:.4f}"


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB" if n < 10**6 else f"{n / 10**6:,.2f} MB"


def printer(as_json: bool, describe: Callable[[Event], str | None]) -> Callable[[Event], None]:
    """A node's on_event: each event as one JSON line (`--json`), else as the line `describe` makes of it."""

    def emit(event: Event) -> None:
        if as_json:
            print(json.dumps(encode_event(event)), flush=True)
            return
        line = describe(event)
        if line:
            print(line, flush=True)

    return emit


def describe_aggregator_event(e: Event) -> str | None:
    """One human line for an aggregator event."""
    if isinstance(e, AggregatorReady):
        resumed = f", resumed at round {e.round} with {e.spooled_updates} spooled update(s)" if e.resumed else ""
        lines = [f"aggregator {e.fingerprint} serving run {e.run!r} (config {e.config_hash[:12]}){resumed}"]
        lines += [f"  join with: peer --join {m}" for m in e.maddrs]
        shard = ""
        if e.shards > 1:
            shard = f", shard {e.shard + 1} of {e.shards} ({e.num_params:,} parameters)"
        if e.standby_of:
            lines.append(f"standby for aggregator {e.standby_of}{shard}: serves nothing until that one goes")
        else:
            lines.append(f"round {e.round} open, held-out loss {_loss(e.val_loss)}{shard}")
        return "\n".join(lines)
    if isinstance(e, RoundClosed):
        return (
            f"round {e.round} closed ({e.closed_by}): held-out loss {_loss(e.val_loss)}, {len(e.accepted)} update(s) "
            f"accepted, {e.rejected} rejected, {e.tokens:,} tokens, aggregate {_kb(e.aggregate_bytes)}, "
            f"{e.round_s:.1f} s (aggregation {e.aggregation_s:.2f} s)"
        )
    if isinstance(e, UpdateRejected):
        return f"rejected an update from {e.fingerprint} for round {e.round}: {e.reason}"
    if isinstance(e, StatusPage):
        return f"status page: {e.url}"
    if isinstance(e, RoundError):
        return f"error in round {e.round}: {e.detail}"
    if isinstance(e, Following):
        return f"standing by for aggregator {e.primary}: a copy of its shard at round {e.round}"
    if isinstance(e, Followed):
        return f"standby: applied round {e.round}'s aggregate (state {e.state_sha256[:12]})"
    if isinstance(e, Takeover):
        return (
            f"aggregator {e.primary} is gone: taking its shard over at round {e.round}, "
            f"waiting for the {e.expected} peer(s) it last heard from"
        )
    if isinstance(e, AggregatorDone):
        return f"aggregator stopped after {e.rounds_closed} round(s); next round would be {e.round}"
    return None


def describe_peer_event(e: Event) -> str | None:
    """One human line for a peer event (one per round)."""
    if isinstance(e, PeerSynced):
        given = [n for n, b in e.state_sources.items() if b]
        spread = f" from {len(given)} sources" if len(given) > 1 else ""
        return f"peer {e.fingerprint} joined run {e.run!r} at round {e.round} (state {_kb(e.state_bytes)}{spread})"
    if isinstance(e, DonorDropped):
        return f"stopped fetching state chunks from {e.donor} ({e.reason}); the others give the rest"
    if isinstance(e, PeerRound):
        verdict = "accepted" if e.accepted else f"rejected ({e.reason})"
        if e.points is not None and e.accepted:
            verdict += f", +{e.points:,.0f} points"
        network = e.upload_s + e.wait_s + e.download_s
        hidden = " (overlapped)" if e.overlap else ""
        stale = f" ({e.stale_steps} stale)" if e.stale_steps else ""
        held_out = "" if e.val_loss is None else f" | held-out {e.val_loss:.3f}"
        return (
            f"round {e.round:>4} | loss {e.loss:.3f}{held_out} | {e.tokens_per_s:,.0f} tok/s | "
            f"up {_kb(e.bytes_up)} "
            f"down {_kb(e.bytes_down)} | {e.inner_steps} steps{stale} in {e.compute_s:.1f} s, "
            f"network {network:.1f} s{hidden} | {verdict}"
        )
    if isinstance(e, PeerPlan):
        return AutoPlan(**{k: v for k, v in encode_event(e).items() if k != "event"}).line()
    if isinstance(e, Failover):
        return f"shard {e.shard}: aggregator {e.from_} is gone; switched to its standby {e.to}"
    if isinstance(e, StateRefused):
        return f"refused the state aggregator {e.aggregator} served ({e.detail}); trying another source"
    if isinstance(e, Finished):
        return e.detail
    if isinstance(e, PeerDone):
        return (
            f"left after {e.rounds} round(s): {e.accepted} accepted, {e.rejected} rejected, "
            f"up {_kb(e.bytes_up)}, down {_kb(e.bytes_down)}, {e.score:,.0f} points in "
            f"{e.receipts} verified receipt(s)"
            + (
                f", {e.inner_steps} inner steps, busy {e.compute_utilization:.0%} of the time"
                if e.compute_utilization is not None
                else ""
            )
        )
    if isinstance(e, StatusPage):
        return f"status page: {e.url}"
    if isinstance(e, ReceiptInvalid):
        return f"round {e.round}: the aggregator's receipt does not verify: {e.detail}"
    return None


def describe_serverless_event(event: Event) -> str | None:
    """One status line per serverless event worth a human's attention."""
    if isinstance(event, ServerlessReady):
        maddrs = event.maddrs or ("?",)
        return f"serverless peer up; others join with: peer --serverless --join {maddrs[0]}"
    if isinstance(event, ServerlessSynced):
        return f"run {event.run!r}: starting at round {event.round} (state from the {event.source})"
    if isinstance(event, ServerlessRound):
        return (
            f"round {event.round}: held-out loss {event.val_loss:.4f}, averaged in a group of {event.group} "
            f"({event.average_s:.1f} s), {event.tokens} tokens"
        )
    return None
