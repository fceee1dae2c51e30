"""The one human line per node event that `potluck aggregator` and `potluck peer` print (or the JSON object).

Status goes to stdout, one line per event (or one JSON object per line with `--json`, which is what
`potluck swarm` reads); logs go to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def _loss(value: object) -> str:
    """A held-out loss for a status line; a shard's aggregator has none (its peers score the model)."""
    return "n/a (sharded)" if value is None else f"{value:.4f}"


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB" if n < 10**6 else f"{n / 10**6:,.2f} MB"


def printer(
    as_json: bool, describe: Callable[[dict[str, object]], str | None]
) -> Callable[[dict[str, object]], None]:
    """A node's on_event: each event as one JSON line (`--json`), else as the line `describe` makes of it."""

    def emit(event: dict[str, object]) -> None:
        if as_json:
            print(json.dumps(event), flush=True)
            return
        line = describe(event)
        if line:
            print(line, flush=True)

    return emit


def describe_aggregator_event(e: dict[str, Any]) -> str | None:
    """One human line for an aggregator event."""
    kind = e.get("event")
    if kind == "ready":
        resumed = (
            f", resumed at round {e['round']} with {e['spooled_updates']} spooled update(s)" if e["resumed"] else ""
        )
        lines = [
            f"aggregator {e['fingerprint']} serving run {e['run']!r} (config {str(e['config_hash'])[:12]}){resumed}"
        ]
        lines += [f"  join with: peer --join {m}" for m in e["maddrs"]]  # type: ignore[union-attr]
        shard = ""
        if e.get("shards", 1) > 1:
            shard = f", shard {e['shard'] + 1} of {e['shards']} ({e['num_params']:,} parameters)"
        if e.get("standby_of"):
            lines.append(f"standby for aggregator {e['standby_of']}{shard}: serves nothing until that one goes")
        else:
            lines.append(f"round {e['round']} open, held-out loss {_loss(e['val_loss'])}{shard}")
        return "\n".join(lines)
    if kind == "round":
        peers = len(e["accepted"])
        return (
            f"round {e['round']} closed ({e['closed_by']}): held-out loss {_loss(e['val_loss'])}, {peers} update(s) "
            f"accepted, {e['rejected']} rejected, {e['tokens']:,} tokens, aggregate {_kb(e['aggregate_bytes'])}, "
            f"{e['round_s']:.1f} s (aggregation {e['aggregation_s']:.2f} s)"
        )
    if kind == "rejected":
        return f"rejected an update from {e['fingerprint']} for round {e['round']}: {e['reason']}"
    if kind == "status-page":
        return f"status page: {e['url']}"
    if kind == "error":
        return f"error in round {e['round']}: {e['detail']}"
    if kind == "following":
        return f"standing by for aggregator {e['primary']}: a copy of its shard at round {e['round']}"
    if kind == "followed":
        return f"standby: applied round {e['round']}'s aggregate (state {str(e['state_sha256'])[:12]})"
    if kind == "takeover":
        return (
            f"aggregator {e['primary']} is gone: taking its shard over at round {e['round']}, "
            f"waiting for the {e['expected']} peer(s) it last heard from"
        )
    if kind == "done":
        return f"aggregator stopped after {e['rounds_closed']} round(s); next round would be {e['round']}"
    return None


def describe_peer_event(e: dict[str, Any]) -> str | None:
    """One human line for a peer event (one per round)."""
    kind = e.get("event")
    if kind == "synced":
        sources = e.get("state_sources") or {}
        given = [n for n, b in sources.items() if b]
        spread = f" from {len(given)} sources" if len(given) > 1 else ""
        return (
            f"peer {e['fingerprint']} joined run {e['run']!r} at round {e['round']} "
            f"(state {_kb(e['state_bytes'])}{spread})"
        )
    if kind == "donor-dropped":
        return f"stopped fetching state chunks from {e['donor']} ({e['reason']}); the others give the rest"
    if kind == "round":
        verdict = "accepted" if e["accepted"] else f"rejected ({e['reason']})"
        if e.get("points") is not None and e["accepted"]:
            verdict += f", +{e['points']:,.0f} points"
        network = e["upload_s"] + e["wait_s"] + e["download_s"]
        hidden = " (overlapped)" if e.get("overlap") else ""
        stale = f" ({e['stale_steps']} stale)" if e.get("stale_steps") else ""
        held_out = "" if e.get("val_loss") is None else f" | held-out {e['val_loss']:.3f}"
        return (
            f"round {e['round']:>4} | loss {e['loss']:.3f}{held_out} | {e['tokens_per_s']:,.0f} tok/s | "
            f"up {_kb(e['bytes_up'])} "
            f"down {_kb(e['bytes_down'])} | {e.get('inner_steps', '?')} steps{stale} in {e['compute_s']:.1f} s, "
            f"network {network:.1f} s{hidden} | {verdict}"
        )
    if kind == "plan":
        from potluck.planning.plan import AutoPlan

        return AutoPlan(**{k: v for k, v in e.items() if k != "event"}).line()
    if kind == "failover":
        return f"shard {e['shard']}: aggregator {e['from']} is gone; switched to its standby {e['to']}"
    if kind == "state-refused":
        return f"refused the state aggregator {e['aggregator']} served ({e['detail']}); trying another source"
    if kind == "finished":
        return str(e["detail"])
    if kind == "done":
        return (
            f"left after {e['rounds']} round(s): {e['accepted']} accepted, {e['rejected']} rejected, "
            f"up {_kb(e['bytes_up'])}, down {_kb(e['bytes_down'])}, {e.get('score', 0):,.0f} points in "
            f"{e.get('receipts', 0)} verified receipt(s)"
            + (
                f", {e['inner_steps']} inner steps, busy {e['compute_utilization']:.0%} of the time"
                if e.get("compute_utilization") is not None
                else ""
            )
        )
    if kind == "status-page":
        return f"status page: {e['url']}"
    if kind == "receipt-invalid":
        return f"round {e['round']}: the aggregator's receipt does not verify: {e['detail']}"
    return None


def describe_serverless_event(event: dict[str, object]) -> str | None:
    """One status line per serverless event worth a human's attention."""
    kind = event.get("event")
    if kind == "ready":
        maddrs = event.get("maddrs") or ["?"]
        return f"serverless peer up; others join with: peer --serverless --join {maddrs[0]}"  # type: ignore[index]
    if kind == "synced":
        return f"run {event['run']!r}: starting at round {event['round']} (state from the {event['source']})"
    if kind == "round":
        return (
            f"round {event['round']}: held-out loss {event['val_loss']:.4f}, averaged in a group of {event['group']} "
            f"({event['average_s']:.1f} s), {event['tokens']} tokens"
        )
    return None
