"""What the nodes report as they run: one frozen dataclass per event kind, with one JSON codec.

A node calls `on_event(SomeEvent(...))`; the CLI prints `encode_event(e)` as one JSON line (`--json`),
`potluck swarm` reads its children's lines back with `decode_event`, the status pages fold the
dataclasses. The JSON of every kind is `{"event": KIND, <its fields>}`: scripts, `potluck swarm --json`
and the status page's /api/* rely on these keys, so a field is renamed here or nowhere.

Several producers share a kind ("ready", "round", "synced", "done" come from the aggregator, the peer
and the serverless peer, each with its own fields); `decode_event` tells them apart by their keys.
This module imports nothing of potluck's: every component may import it.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from potluck.errors import PotluckError


class EventError(PotluckError, ValueError):
    """A dict that is not an event of this version: unknown kind, missing or unknown field, wrong type."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """The base of every event kind; `KIND` is its `"event"` value in JSON."""

    KIND: ClassVar[str] = ""


# ----------------------------------------------------------------- nested records


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerHead:
    """A signed ledger chain head as JSON-able values (hex for bytes)."""

    round: int
    last_row_id: int
    head_hash: str  # hex
    row_count: int
    timestamp_s: float
    aggregator_public_key: str  # hex
    signature: str  # hex


@dataclass(frozen=True, kw_only=True, slots=True)
class Standing:
    """One leaderboard line of the ledger, as the aggregator's ready event gives it."""

    fingerprint: str
    public_key: str  # hex
    points: float
    accepted: int  # updates of this key the ledger accepted


@dataclass(frozen=True, kw_only=True, slots=True)
class AcceptedUpdate:
    """One update that made it into a closed round's aggregate."""

    fingerprint: str
    tokens: int
    bytes: int  # its payload's size
    update: str  # the first 16 hex digits of its digest
    credit: float  # points the ledger booked for it


@dataclass(frozen=True, kw_only=True, slots=True)
class Credit:
    """Points the ledger booked for one key in a closed round."""

    fingerprint: str
    public_key: str  # hex
    credit: float


# ----------------------------------------------------------------- the aggregator's


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregatorReady(Event):
    """The aggregator listens: how to join, the run it serves and where that run stands."""

    KIND: ClassVar[str] = "ready"
    maddrs: tuple[str, ...]
    fingerprint: str
    run: str
    config_hash: str
    round: int  # the open round
    resumed: bool  # restarted from its state dir's checkpoint
    spooled_updates: int  # updates of the open round restored from the spool
    val_loss: float | None  # the state's held-out loss; None for a shard's aggregator
    num_params: int  # this shard's
    shard: int
    shards: int
    state_sha256: str
    rounds_total: int
    round_deadline_s: float
    model: str
    codec: str
    aggregate_codec: str
    density: float
    leaderboard: tuple[Standing, ...]
    ledger_head: LedgerHead | None
    standby_of: str | None  # the primary's fingerprint when this one stands by


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundOpened(Event):
    """A round opened for uploads."""

    KIND: ClassVar[str] = "round-open"
    round: int
    deadline_s: float  # seconds left until it closes at the latest
    time_s: float  # unix time


@dataclass(frozen=True, kw_only=True, slots=True)
class Joined(Event):
    """A peer (by the key it names, unproven) asked for the state of the open round."""

    KIND: ClassVar[str] = "joined"
    fingerprint: str
    round: int
    client_mode: bool | None  # as the peer says (None: it did not say): unauthenticated, shown on the status page only
    time_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateReceived(Event):
    """An upload arrived and was judged on arrival."""

    KIND: ClassVar[str] = "received"
    fingerprint: str
    round: int
    tokens: int
    bytes: int
    accepted: bool
    check: str | None  # the check that refused it
    time_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateRejected(Event):
    """An update was refused, on arrival or at round close."""

    KIND: ClassVar[str] = "rejected"
    fingerprint: str
    round: int
    check: str
    reason: str
    update: str | None  # the first 16 hex digits of its digest, when it parsed


@dataclass(frozen=True, kw_only=True, slots=True)
class Banned(Event):
    """A key is banned (by its strikes or by the admin)."""

    KIND: ClassVar[str] = "banned"
    fingerprint: str
    round: int
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Unbanned(Event):
    """The admin lifted a key's ban."""

    KIND: ClassVar[str] = "unbanned"
    fingerprint: str


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundClosed(Event):
    """The aggregator closed a round: what it kept, what it cost, and the state it published."""

    KIND: ClassVar[str] = "round"
    round: int
    closed_by: str  # why it closed (deadline, all reported, tokens, admin)
    val_loss: float | None  # the new state's held-out loss; None for a shard's aggregator
    accepted: tuple[AcceptedUpdate, ...]
    rejected: int
    density: float  # the round's upload density
    next_density: float  # the next round's
    round_s: float
    aggregation_s: float
    aggregate_bytes: int
    state_sha256: str
    tokens: int
    time_s: float
    bytes_in: int  # totals since start
    bytes_out: int
    ledger_head: LedgerHead | None
    credits: tuple[Credit, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundError(Event):
    """A round could not close (ledger or checkpoint write failed); it is retried."""

    KIND: ClassVar[str] = "error"
    round: int
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Takeover(Event):
    """A standby took its primary's shard over."""

    KIND: ClassVar[str] = "takeover"
    round: int
    primary: str  # the gone aggregator's fingerprint
    state_sha256: str
    expected: int  # peers it waits for: those the primary last heard from


@dataclass(frozen=True, kw_only=True, slots=True)
class Following(Event):
    """A standby holds a copy of its primary's shard and follows it."""

    KIND: ClassVar[str] = "following"
    round: int
    primary: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Followed(Event):
    """A standby applied its primary's aggregate of `round`."""

    KIND: ClassVar[str] = "followed"
    round: int
    state_sha256: str


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregatorDone(Event):
    """The aggregator stopped."""

    KIND: ClassVar[str] = "done"
    round: int  # the round it would open next
    rounds_closed: int


# ----------------------------------------------------------------- the peer's


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerSynced(Event):
    """The peer downloaded the run's state."""

    KIND: ClassVar[str] = "synced"
    run: str
    round: int
    aggregator: str  # the fingerprint of the aggregator it synced from
    fingerprint: str  # its own
    state_bytes: int
    state_sources: dict[str, int]  # bytes of the state's chunks per donor (aggregators and peers alike)
    shards: int
    val_loss: float | None  # the state's held-out loss (PeerOptions.eval_batches)


@dataclass(frozen=True, kw_only=True, slots=True)
class StateRefused(Event):
    """The peer refused a state an aggregator served, and tries another source."""

    KIND: ClassVar[str] = "state-refused"
    aggregator: str
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DonorDropped(Event):
    """The peer stopped fetching state chunks from a donor."""

    KIND: ClassVar[str] = "donor-dropped"
    donor: str
    reason: str
    shard: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerPlan(Event):
    """What the peer's measured machine and link predict for the run (potluck.planning.plan.AutoPlan's fields)."""

    KIND: ClassVar[str] = "plan"
    peers: int
    local_steps: int
    target_k: float
    step_s: float
    device_flops: float
    up_bits_per_s: float
    down_bits_per_s: float
    upload_bytes: int
    download_bytes: int
    round_compute_s: float
    round_network_s: float
    K: float
    local_steps_for_k: int
    K_potluck: float
    local_steps_for_k_potluck: int
    density_for_k: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerRound(Event):
    """The peer finished a round: its training, its traffic and the verdict on its update."""

    KIND: ClassVar[str] = "round"
    round: int
    loss: float  # mean training loss of its inner steps
    val_loss: float | None  # the master state's held-out loss after the round (eval_batches)
    tokens: int
    inner_steps: int
    stale_steps: int  # of inner_steps, taken before this round's base arrived (overlap)
    tokens_per_s: float
    accepted: bool
    reason: str  # why not, or a note on an accepted one
    update: str  # names it in the aggregator's events
    bytes_up: int
    state_bytes_served: int  # so far: chunks of the state given to joiners
    bytes_down: int
    compute_s: float
    encode_s: float
    upload_s: float
    wait_s: float
    download_s: float
    points: float | None  # credited by the final receipts (None: one did not check out)
    receipt_s: float  # fetching and checking them
    overlap: bool
    overlap_limit: float  # the share of a round's steps that may run stale
    shards: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptReceived(Event):
    """The aggregator's final receipt for the peer's update verified."""

    KIND: ClassVar[str] = "receipt"
    round: int
    accepted: bool
    tokens_credited: int
    score: float
    reason: str
    update: str
    shard: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptInvalid(Event):
    """The aggregator's final receipt did not verify."""

    KIND: ClassVar[str] = "receipt-invalid"
    round: int
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Failover(Event):
    """The peer switched a shard to another aggregator (its standby) after the first went away."""

    KIND: ClassVar[str] = "failover"
    shard: int
    from_: str = field(metadata={"key": "from"})  # the gone aggregator's fingerprint
    to: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Finished(Event):
    """The run is complete (or has finished before this peer joined)."""

    KIND: ClassVar[str] = "finished"
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerDone(Event):
    """What the peer did, as it leaves: the last status line and `potluck swarm`'s per-peer row."""

    KIND: ClassVar[str] = "done"
    fingerprint: str
    rounds: int
    accepted: int
    rejected: int
    bytes_up: int
    bytes_down: int
    state_bytes_served: int  # chunks of the state given to joiners (in bytes_up)
    receipts: int
    score: float
    tokens: int
    inner_steps: int
    compute_s: float
    active_s: float  # from the first inner step's start to the last one's end
    compute_utilization: float | None  # compute_s / active_s; None before any step
    overlap: bool
    speed: float
    nice: int | None  # its CPU priority, where the platform has one


@dataclass(frozen=True, kw_only=True, slots=True)
class Adversarial(Event):
    """A red-team peer made an upload (it may make several a round, under other keys)."""

    KIND: ClassVar[str] = "adversarial"
    round: int
    update: str


# ----------------------------------------------------------------- the serverless peer's


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerlessReady(Event):
    """A serverless peer is up."""

    KIND: ClassVar[str] = "ready"
    role: str  # "serverless-peer"
    run: str
    maddrs: tuple[str, ...]
    val_loss: float
    num_params: int
    round: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerlessSynced(Event):
    """A serverless peer caught up with the run."""

    KIND: ClassVar[str] = "synced"
    run: str
    round: int
    source: str  # where its state came from


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerlessRound(Event):
    """A serverless peer averaged a round with whoever it found."""

    KIND: ClassVar[str] = "round"
    round: int
    loss: float
    val_loss: float
    tokens: int
    inner_steps: int
    compute_s: float
    average_s: float
    group: int  # peers in this round's all-reduce, this one included (1: it averaged alone)
    time_s: float


# ----------------------------------------------------------------- any node's, and the swarm's


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusPage(Event):
    """A node serves its status page at `url`."""

    KIND: ClassVar[str] = "status-page"
    url: str


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmKilled(Event):
    """`potluck swarm --kill-aggregator-at` killed a child (a testing aid)."""

    KIND: ClassVar[str] = "killed"
    child: str
    after_round: int


EVENT_TYPES: tuple[type[Event], ...] = (
    AggregatorReady,
    RoundOpened,
    Joined,
    UpdateReceived,
    UpdateRejected,
    Banned,
    Unbanned,
    RoundClosed,
    RoundError,
    Takeover,
    Following,
    Followed,
    AggregatorDone,
    PeerSynced,
    StateRefused,
    DonorDropped,
    PeerPlan,
    PeerRound,
    ReceiptReceived,
    ReceiptInvalid,
    Failover,
    Finished,
    PeerDone,
    Adversarial,
    ServerlessReady,
    ServerlessSynced,
    ServerlessRound,
    StatusPage,
    SwarmKilled,
)

_BY_KIND: dict[str, list[type[Event]]] = {}
for _t in EVENT_TYPES:
    _BY_KIND.setdefault(_t.KIND, []).append(_t)


def _key(f: dataclasses.Field[Any]) -> str:
    """A field's JSON key: its name, unless the key is a Python keyword (`from`)."""
    return f.metadata.get("key", f.name)


def _keys(cls: type) -> set[str]:
    return {_key(f) for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------- encoding


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_key(f): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def encode_event(event: Event) -> dict[str, Any]:
    """The event as a JSON-able dict: `{"event": KIND, <its fields in declaration order>}`."""
    return {"event": event.KIND, **typing.cast(dict[str, Any], _plain(event))}


# ----------------------------------------------------------------- decoding


def _decode(tp: Any, value: object, where: str) -> object:
    """`value` (from JSON) as type `tp`; EventError naming `where` when it is not one."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        problems = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _decode(option, value, where)
            except EventError as e:
                problems.append(str(e))
        raise EventError("; ".join(problems))
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list | tuple):
            raise EventError(f"{where} must be a list, not {type(value).__name__}")
        return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise EventError(f"{where} must be an object with string keys")
        return {k: _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise EventError(f"{where} must be an object, not {type(value).__name__}")
        return _fields(tp, value, where)
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise EventError(f"{where} must be {tp.__name__}, not {type(value).__name__} ({str(value)[:40]!r})")
    return value


def _fields(cls: type, data: dict[str, Any], where: str) -> Any:
    """An instance of dataclass `cls` from `data`'s fields (every one present, none unknown, each typed)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls)]
    missing = [_key(f) for f in fields if _key(f) not in data]
    unknown = sorted(set(data) - {_key(f) for f in fields})
    if missing or unknown:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise EventError(f"{where} is not a {cls.__name__}: " + "; ".join(problems))
    values = {f.name: _decode(hints[f.name], data[_key(f)], f"{where}.{_key(f)}") for f in fields}
    return cls(**values)


def decode_event(data: dict[str, Any]) -> Event:
    """The event a JSON object describes (as `encode_event` wrote it); EventError when it is none of this version's.

    Every field must be present with its type (an int counts as a float, a bool as neither) and none may
    be unknown: a renamed or retyped field fails here, loudly, instead of reading as missing downstream.
    """
    if not isinstance(data, dict):
        raise EventError(f"an event is a JSON object, not {type(data).__name__}")
    kind = data.get("event")
    candidates = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if not candidates:
        raise EventError(f"unknown event kind {str(kind)[:40]!r}")
    body = {k: v for k, v in data.items() if k != "event"}
    # Kinds several producers share: the one whose keys match best, then its own checks say what is off.
    cls = max(candidates, key=lambda c: len(_keys(c) & body.keys()) - len(_keys(c) ^ body.keys()))
    return typing.cast(Event, _fields(cls, body, f"{kind!r} event"))
