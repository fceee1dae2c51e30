"""A node's flags are declared once: the model renders to argv, and the real command parses it back the same."""

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from potluck.cli import aggregator as aggregator_command
from potluck.cli import peer as peer_command
from potluck.cli.aggregator import AggregatorFlags
from potluck.cli.app import app
from potluck.cli.common import UsageError
from potluck.cli.flags import Flags
from potluck.cli.peer_flags import PeerFlags
from potluck.cli.serverless import ServerlessFlags

MADDR = "/ip4/127.0.0.1/tcp/4000/p2p/QmW9UW5tnG2dvJ9UU5Jv5NCLz24ZtQxyLB3hFQC33jHouD"

NODE = {
    "join": (MADDR, "http://127.0.0.1:8000"),
    "identity": Path("/tmp/peer-3.key"),
    "data": "hf:/data/wiki",
    "task": "their_tasks.digits:DigitsTask",
    "device": "cpu",
    "batch_size": 3,
    "micro_batch": 1,
    "checkpointing": True,
    "return_memory": True,
    "max_rounds": 5,
    "client_mode": True,
    "port": 4001,
    "host": "127.0.0.2",
    "threads": 2,
    "speed": 0.25,
    "as_json": True,
}
PEER = PeerFlags(
    **NODE,
    run="tiny",
    aggregator_key=("ab" * 32, "cd" * 32),
    tokenizer=Path("/tmp/tokenizer.json"),
    reconnect_timeout=12.5,
    join_timeout=7.0,
    receipts=Path("/tmp/receipts/peer-3"),
    http_port=8123,
    http_host="0.0.0.0",
    overlap=True,
    overlap_limit=0.5,
    plan=True,
    plan_peers=3,
    eval_batches=4,
    serve_state=False,
)
SERVERLESS = ServerlessFlags(**NODE, config=Path("/tmp/run.toml"), set_=("local_steps=3", "inner.lr=0.001"))


def _parsed_by_the_peer_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Flags:
    """What the `peer` command a swarm child runs makes of `argv` (the node itself is not started)."""
    got: list[Flags] = []
    monkeypatch.setattr(peer_command, "run_peer", got.append)
    monkeypatch.setattr(peer_command, "run_serverless_peer", got.append)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert len(got) == 1
    return got[0]


@pytest.mark.parametrize("flags", [PEER, SERVERLESS], ids=["peer", "serverless"])
def test_every_flag_survives_the_round_trip_through_argv_and_the_peer_command(
    flags: PeerFlags | ServerlessFlags, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: every field away from its default, so that each one is rendered and parsed
    unset = [name for name, field in type(flags).model_fields.items() if getattr(flags, name) == field.default]
    assert not unset, unset
    # Execute
    argv = flags.command()
    parsed = _parsed_by_the_peer_command(argv, monkeypatch)
    # Assert
    assert parsed == flags
    assert type(parsed) is type(flags)


def test_every_aggregator_flag_survives_the_round_trip_through_argv_and_the_aggregator_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: every field away from its default
    flags = AggregatorFlags(
        config=Path("/tmp/run.toml"),
        state_dir=Path("/tmp/aggregator-1"),
        task="their_tasks.digits:DigitsTask",
        identity=Path("/tmp/aggregator-1.key"),
        host="127.0.0.1",
        port=4100,
        announce=("/ip4/203.0.113.7/tcp/4100",),
        join=(MADDR,),
        multiaddr_file=Path("/tmp/maddrs"),
        max_rounds=9,
        wait_for_peers=3,
        failover_after=5.0,
        state_upload_rate="20mbit",
        max_connections=8192,
        set_=("local_steps=3",),
        threads=2,
        http_port=0,
        http_host="0.0.0.0",
        http_per_address=8,
        admin_token_file=Path("/tmp/token"),
        as_json=True,
    )
    assert not [n for n, f in AggregatorFlags.model_fields.items() if getattr(flags, n) == f.default]
    got: list[AggregatorFlags] = []
    monkeypatch.setattr(aggregator_command, "run_aggregator", got.append)
    # Execute
    result = CliRunner().invoke(app, flags.command())
    # Assert
    assert result.exit_code == 0, result.output
    assert got == [flags]


def test_a_state_upload_rate_that_is_no_rate_is_refused_before_anything_runs() -> None:
    with pytest.raises(UsageError, match="^--state-upload-rate: "):
        AggregatorFlags.parsed({"state_upload_rate": "fast"})


def test_a_peer_with_every_default_is_started_with_no_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PeerFlags().command() == ["peer"]
    assert ServerlessFlags().command() == ["peer", "--serverless"]
    assert _parsed_by_the_peer_command(["peer", "--serverless"], monkeypatch) == ServerlessFlags()


def test_a_switch_that_is_on_by_default_is_rendered_off() -> None:
    assert PeerFlags(serve_state=False).argv() == ["--no-serve-state"]
    assert PeerFlags(overlap=True, overlap_limit=0.5).argv() == ["--overlap", "--overlap-limit", "0.5"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"overlap_limit": 0.5}, "--overlap-limit only applies with --overlap"),
        ({"speed": 2.0}, "--speed: Input should be less than or equal to 1"),
        ({"port": 70000}, "--port: Input should be less than or equal to 65535"),
        ({"threads": 0}, "--threads: Input should be greater than or equal to 1"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_a_broken_rule_is_one_usage_line_naming_the_flag(values: dict[str, object], expected: str) -> None:
    with pytest.raises(UsageError) as raised:
        PeerFlags.parsed(values)
    assert str(raised.value) == expected


def test_a_copy_with_changes_is_checked_like_any_other() -> None:
    assert PeerFlags().replace(speed=0.5).speed == 0.5
    with pytest.raises(UsageError, match="--overlap-limit only applies with --overlap"):
        PEER.replace(overlap=False)


def test_the_flags_give_the_node_every_option_it_takes() -> None:
    # Prepare
    from potluck.peer.options import PeerOptions

    # Execute
    options = PEER.peer_options(join=(MADDR,), tokenizer="ab" * 32)
    # Assert: each of the node's options comes from a flag (device: cpu is its default too), the tokenizer's
    # sha256 from the file --tokenizer names
    defaults = PeerOptions(join=())
    same = [f.name for f in dataclasses.fields(PeerOptions) if getattr(options, f.name) == getattr(defaults, f.name)]
    assert same == ["device"], same
    assert options.host_maddrs == ("/ip4/127.0.0.2/tcp/4001",)
    assert options.receipts_dir == Path("/tmp/receipts/peer-3")
    assert (options.reconnect_timeout_s, options.join_timeout_s) == (12.5, 7.0)


@pytest.mark.parametrize("source", ["x.jsonl", "rows.parquet", "texts/", "hf:/data/wiki", "builtin"])
def test_every_kind_of_data_source_is_taken_by_data(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PeerFlags.parsed({"data": source}).data == source
    assert _parsed_by_the_peer_command(["peer", "--data", source], monkeypatch) == PeerFlags(data=source)


@pytest.mark.parametrize(
    ("source", "expected"), [(" ", "--data ' ': must be"), ("hf:", "--data 'hf:': \"hf:\" needs")]
)
def test_data_that_names_no_source_is_one_usage_line(source: str, expected: str) -> None:
    with pytest.raises(UsageError) as raised:
        ServerlessFlags.parsed({"data": source})
    assert str(raised.value).startswith(expected)
