"""Serverless mode's pure parts: the compression it asks hivemind for, and reading untrusted status records."""

import math
from types import SimpleNamespace

import pytest

from potluck.peer.serverless import averaging_prefix, hivemind_compression, parse_status_records
from potluck.protocol.config import RunConfig


@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        ("none", "NoCompression"),
        ("int8", "Uniform8BitQuantization"),
        ("fp16", "Float16Compression"),
        ("dct-topk", "Float16Compression"),  # hivemind has no top-k: the state goes in fp16
    ],
)
def test_the_state_travels_in_the_closest_hivemind_compression(codec: str, expected: str) -> None:
    assert type(hivemind_compression(codec)).__name__ == expected


def test_two_runs_or_two_configs_never_share_an_averaging_prefix() -> None:
    base = RunConfig()

    prefixes = {
        averaging_prefix(base),
        averaging_prefix(base.with_overrides({"run_name": "other"}, source="test")),
        averaging_prefix(base.with_overrides({"local_steps": 31}, source="test")),
    }

    assert len(prefixes) == 3


def _record(**changes: object) -> SimpleNamespace:
    value = {"round": 3, "rounds": 6, "val_loss": 2.5, "group": 3, "time_s": 1_700_000_000.0} | changes
    return SimpleNamespace(value=value)


def test_status_records_are_grouped_by_run_newest_first() -> None:
    records = {
        "run-a/peer-1": _record(time_s=1.0),
        "run-a/peer-2": _record(time_s=2.0),
        "run/with/slash/peer-3": _record(),
    }

    runs = parse_status_records(records)

    assert [p["peer"] for p in runs["run-a"]] == ["peer-2", "peer-1"]
    assert runs["run/with/slash"][0] == {
        "peer": "peer-3",
        "round": 3,
        "rounds": 6,
        "val_loss": 2.5,
        "group": 3,
        "time_s": 1_700_000_000.0,
    }


@pytest.mark.parametrize(
    "records",
    [
        None,
        ["not", "a", "map"],
        {"no-slash": _record()},
        {"/peer": _record()},
        {"run/": _record()},
        {7: _record()},
        {"run/p": SimpleNamespace(value="junk")},
        {"run/p": "no value attribute"},
        {"run/p": _record(val_loss=math.nan)},
        {"run/p": _record(val_loss="2.5")},
        {"run/p": _record(round=-1)},
        {"run/p": _record(group=True)},
        {"run/p": _record(time_s=None)},
    ],
)
def test_a_malformed_status_record_is_skipped_not_trusted(records: object) -> None:
    assert parse_status_records(records) == {}
