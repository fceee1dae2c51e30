"""What `potluck swarm` prints, piped or at 80-120 columns: a line per round, whole commands, whole cells."""

import io
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.progress import Progress, TextColumn

from potluck.cli.swarm import SUMMARY_COLUMNS, _SwarmProgress, summary_tables
from tests.web.events import ALICE, BOB, closed, ready

MADDR = "/ip4/127.0.0.1/tcp/43210/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def _follow(events: list[tuple[str, object]], *, width: int, terminal: bool) -> tuple[list[str], str]:
    """Feed `events` to the swarm's progress on a console `width` columns wide: its printed lines and its bar."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal)
    with Progress(TextColumn("{task.description}"), console=console, auto_refresh=False) as progress:
        follow = _SwarmProgress(progress, rounds=3, serverless=False)
        for name, event in events:
            follow(name, event)  # type: ignore[arg-type]
        description = progress.tasks[0].description
    return [line for line in out.getvalue().splitlines() if line.strip()], description


def test_piped_output_has_one_status_line_per_round() -> None:
    # Prepare: what `docker logs` or CI sees: no terminal, so no bar is drawn
    rounds = [closed(r, accepted=[ALICE, BOB], val_loss=5.0 - r) for r in range(3)]
    # Execute
    lines, _ = _follow(
        [("aggregator", ready(maddrs=(MADDR,))), *(("aggregator", e) for e in rounds)], width=80, terminal=False
    )
    # Assert
    status = [line for line in lines if line.startswith("round ") and " done | " in line]
    assert [line.split(" | ")[:3] for line in status] == [
        ["round 1/3 done", "held-out loss 5.0000", "2 peers"],
        ["round 2/3 done", "held-out loss 4.0000", "2 peers"],
        ["round 3/3 done", "held-out loss 3.0000", "2 peers"],
    ]


def test_a_terminal_gets_the_bar_not_a_line_per_round() -> None:
    rounds = [closed(r, accepted=[ALICE], val_loss=5.0 - r) for r in range(3)]

    lines, description = _follow([("aggregator", e) for e in rounds], width=120, terminal=True)

    assert not any(" done | " in line for line in lines)
    assert description.startswith("held-out loss 3.0000 | 1 peers")


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_join_command_is_printed_whole_on_one_line_at_any_width(width: int) -> None:
    lines, _ = _follow([("aggregator", ready(maddrs=(MADDR,)))], width=width, terminal=False)

    assert any(line.endswith(f"peer --join {MADDR}") for line in lines), lines


def _result(peers: int) -> SimpleNamespace:
    row = {
        "joined_round": 0,
        "accepted": 12,
        "rejected": 1,
        "inner_steps": 1200,
        "compute_utilization": 0.87,
        "bytes_up": 12_345_678,
        "bytes_down": 98_765_432,
        "rounds": [{"bytes_up": 1_028_806}] * 12,
    }
    rows = [row | {"name": f"adversary-{i}", "fingerprint": f"pl-eh7d-dx5b-ksrg-cy{i:02d}"} for i in range(peers)]
    return SimpleNamespace(rounds_completed=12, wall_s=345.0, num_params=1_234_567, peers=rows)


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_summary_fits_80_to_120_columns_with_every_cell_whole(width: int) -> None:
    # Prepare
    result = _result(peers=8)
    out = io.StringIO()
    console = Console(file=out, width=width)
    # Execute
    for table in summary_tables(result, width=width):
        console.print(table)
    text = out.getvalue()
    # Assert: nothing cut short, nothing past the edge, every header and value whole
    assert "…" not in text
    assert all(len(line) <= width for line in text.splitlines())
    for column in SUMMARY_COLUMNS:
        assert f" {column} " in text, column
    for row in result.peers:
        assert row["name"] in text and row["fingerprint"] in text
    assert "12.35 MB" in text and "98.77 MB" in text and "87%" in text


def test_a_wide_terminal_gets_the_summary_as_one_table() -> None:
    assert len(summary_tables(_result(peers=3), width=200)) == 1
