"""Every event kind survives JSON unchanged, keeps the keys scripts read, and a hostile dict is refused."""

import dataclasses
import json
import math
import types
import typing
from typing import Any

import pytest

from potluck.events import (
    EVENT_TYPES,
    AcceptedUpdate,
    AggregatorDone,
    AggregatorReady,
    Event,
    EventError,
    Failover,
    PeerRound,
    PeerSynced,
    RoundClosed,
    ServerlessRound,
    decode_event,
    encode_event,
)

# The JSON keys of every kind, in order: `--json`, `potluck swarm --json` and /api/* are read by these names.
KEYS: dict[str, list[str]] = {  # by class name
    "AggregatorReady": [
        "event",
        "maddrs",
        "fingerprint",
        "run",
        "config_hash",
        "round",
        "resumed",
        "spooled_updates",
        "val_loss",
        "num_params",
        "shard",
        "shards",
        "state_sha256",
        "rounds_total",
        "round_deadline_s",
        "model",
        "codec",
        "aggregate_codec",
        "density",
        "leaderboard",
        "ledger_head",
        "standby_of",
    ],
    "RoundOpened": ["event", "round", "deadline_s", "time_s"],
    "Joined": ["event", "fingerprint", "round", "client_mode", "time_s"],
    "UpdateReceived": ["event", "fingerprint", "round", "tokens", "bytes", "accepted", "check", "time_s"],
    "UpdateRejected": ["event", "fingerprint", "round", "check", "reason", "update"],
    "Banned": ["event", "fingerprint", "round", "reason"],
    "Unbanned": ["event", "fingerprint"],
    "RoundClosed": [
        "event",
        "round",
        "closed_by",
        "val_loss",
        "accepted",
        "rejected",
        "density",
        "next_density",
        "round_s",
        "aggregation_s",
        "aggregate_bytes",
        "state_sha256",
        "tokens",
        "time_s",
        "bytes_in",
        "bytes_out",
        "ledger_head",
        "credits",
    ],
    "RoundError": ["event", "round", "detail"],
    "Takeover": ["event", "round", "primary", "state_sha256", "expected"],
    "Following": ["event", "round", "primary"],
    "Followed": ["event", "round", "state_sha256"],
    "AggregatorDone": ["event", "round", "rounds_closed"],
    "PeerSynced": [
        "event",
        "run",
        "round",
        "aggregator",
        "fingerprint",
        "state_bytes",
        "state_sources",
        "shards",
        "val_loss",
    ],
    "StateRefused": ["event", "aggregator", "detail"],
    "DonorDropped": ["event", "donor", "reason", "shard"],
    "PeerPlan": [
        "event",
        "peers",
        "local_steps",
        "target_k",
        "step_s",
        "device_flops",
        "up_bits_per_s",
        "down_bits_per_s",
        "upload_bytes",
        "download_bytes",
        "round_compute_s",
        "round_network_s",
        "K",
        "local_steps_for_k",
        "K_potluck",
        "local_steps_for_k_potluck",
        "density_for_k",
    ],
    "PeerRound": [
        "event",
        "round",
        "loss",
        "val_loss",
        "tokens",
        "inner_steps",
        "stale_steps",
        "tokens_per_s",
        "accepted",
        "reason",
        "update",
        "bytes_up",
        "state_bytes_served",
        "bytes_down",
        "compute_s",
        "encode_s",
        "upload_s",
        "wait_s",
        "download_s",
        "points",
        "receipt_s",
        "overlap",
        "overlap_limit",
        "shards",
    ],
    "ReceiptReceived": ["event", "round", "accepted", "tokens_credited", "score", "reason", "update", "shard"],
    "ReceiptInvalid": ["event", "round", "detail"],
    "Failover": ["event", "shard", "from", "to"],
    "Finished": ["event", "detail"],
    "PeerDone": [
        "event",
        "fingerprint",
        "rounds",
        "accepted",
        "rejected",
        "bytes_up",
        "bytes_down",
        "state_bytes_served",
        "receipts",
        "score",
        "tokens",
        "inner_steps",
        "compute_s",
        "active_s",
        "compute_utilization",
        "overlap",
        "speed",
        "nice",
    ],
    "Adversarial": ["event", "round", "update"],
    "ServerlessReady": ["event", "role", "run", "maddrs", "val_loss", "num_params", "round"],
    "ServerlessSynced": ["event", "run", "round", "source"],
    "ServerlessRound": [
        "event",
        "round",
        "loss",
        "val_loss",
        "tokens",
        "inner_steps",
        "compute_s",
        "average_s",
        "group",
        "time_s",
    ],
    "StatusPage": ["event", "url"],
    "SwarmKilled": ["event", "child", "after_round"],
}


def _sample(tp: Any, seed: int) -> Any:
    """A value of type `tp` (a field's annotation) that differs by `seed`; None is never chosen."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _sample(next(a for a in typing.get_args(tp) if a is not type(None)), seed)
    if origin is tuple:
        return tuple(_sample(typing.get_args(tp)[0], seed + i) for i in range(2))
    if origin is dict:
        return {f"k{seed}": _sample(typing.get_args(tp)[1], seed), f"k{seed + 1}": _sample(typing.get_args(tp)[1], 0)}
    if dataclasses.is_dataclass(tp):
        return sample(tp, seed)
    return {int: seed, float: seed + 0.5, str: f"s{seed}", bool: seed % 2 == 0}[tp]


def sample(cls: type, seed: int = 1) -> Any:
    """An instance of the dataclass `cls` with every field set, nested records included."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _sample(hints[f.name], seed + i) for i, f in enumerate(dataclasses.fields(cls))})


def _through_json(event: Event) -> Event:
    return decode_event(json.loads(json.dumps(encode_event(event))))


def test_every_event_type_is_registered_once() -> None:
    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in {s, *subclasses(s)}}

    # by name: a slotted dataclass replaces the class it decorates, and the replaced one lingers as a subclass
    assert {c.__name__ for c in EVENT_TYPES} == {c.__name__ for c in subclasses(Event)}
    assert {c.__name__ for c in EVENT_TYPES} == set(KEYS)
    assert len(EVENT_TYPES) == len(set(EVENT_TYPES))


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
def test_every_kind_round_trips_through_json_with_its_keys(cls: type[Event]) -> None:
    # Prepare
    event = sample(cls)
    # Execute
    encoded = encode_event(event)
    back = _through_json(event)
    # Assert
    assert list(encoded) == KEYS[cls.__name__]
    assert encoded["event"] == cls.KIND
    assert type(back) is cls and back == event


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
def test_optional_fields_round_trip_as_null(cls: type[Event]) -> None:
    hints = typing.get_type_hints(cls)
    nullable = {f.name: None for f in dataclasses.fields(cls) if type(None) in typing.get_args(hints[f.name])}
    event = dataclasses.replace(sample(cls), **nullable)
    assert _through_json(event) == event


def test_kinds_that_several_nodes_share_decode_to_their_own_type() -> None:
    for cls in (RoundClosed, PeerRound, ServerlessRound):
        assert type(_through_json(sample(cls))) is cls
    assert type(_through_json(AggregatorDone(round=3, rounds_closed=3))) is AggregatorDone


def test_a_python_keyword_keeps_its_json_key() -> None:
    event = Failover(shard=1, from_="pl-gone", to="pl-standby")
    assert encode_event(event) == {"event": "failover", "shard": 1, "from": "pl-gone", "to": "pl-standby"}
    assert _through_json(event) == event


def test_nested_records_are_frozen_dataclasses() -> None:
    closed = sample(RoundClosed)
    assert isinstance(closed.accepted[0], AcceptedUpdate)
    with pytest.raises(dataclasses.FrozenInstanceError):
        closed.accepted[0].tokens = 5  # type: ignore[misc]  # frozen: the assignment is the point


def test_ints_count_as_floats_and_nan_survives() -> None:
    synced = dataclasses.replace(sample(PeerSynced), val_loss=3)
    assert _through_json(synced) == synced
    diverged = _through_json(dataclasses.replace(sample(PeerRound), loss=math.nan))
    assert isinstance(diverged, PeerRound) and math.isnan(diverged.loss)


def _ready() -> dict[str, Any]:
    return encode_event(sample(AggregatorReady))


@pytest.mark.parametrize(
    ("hostile", "says"),
    [
        ({"event": "mystery", "round": 5}, "unknown event kind 'mystery'"),
        ({"round": 5}, "unknown event kind"),
        ({"event": ["not", "a", "string"]}, "unknown event kind"),
        ({"event": "banned", "fingerprint": "pl-x", "round": 1}, "missing ['reason']"),
        ({"event": "banned", "fingerprint": "pl-x", "round": 1, "reason": "r", "extra": 1}, "unknown ['extra']"),
        ({"event": "banned", "fingerprint": 7, "round": 1, "reason": "r"}, ".fingerprint must be str"),
        ({"event": "banned", "fingerprint": "pl-x", "round": "one", "reason": "r"}, ".round must be int"),
        ({"event": "banned", "fingerprint": "pl-x", "round": True, "reason": "r"}, ".round must be int"),
        ({"event": "banned", "fingerprint": "pl-x", "round": 1.5, "reason": "r"}, ".round must be int"),
        ({"event": "round-open", "round": 1, "deadline_s": "soon", "time_s": 0.0}, ".deadline_s must be float"),
        ({**_ready(), "maddrs": "one"}, ".maddrs must be a list"),
        ({**_ready(), "leaderboard": [1]}, ".leaderboard[0] must be an object"),
        ({**_ready(), "leaderboard": [{"points": 1.0}]}, "is not a Standing: missing"),
        ({**_ready(), "ledger_head": {"round": 1}}, "is not a LedgerHead"),
        ({**_ready(), "resumed": 1}, ".resumed must be bool"),
        ({**encode_event(sample(PeerSynced)), "state_sources": {"pl-x": "lots"}}, ".state_sources.pl-x must be int"),
    ],
)
def test_a_hostile_dict_is_refused_with_a_clear_error(hostile: Any, says: str) -> None:
    with pytest.raises(EventError, match=None) as refused:
        decode_event(hostile)
    assert says in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_something_that_is_not_a_dict_is_refused() -> None:
    with pytest.raises(EventError, match="a JSON object"):
        decode_event([1, 2])  # type: ignore[arg-type]  # a child's line may hold any JSON
