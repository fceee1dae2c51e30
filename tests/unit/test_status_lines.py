"""The one status line a peer prints per round says what a user needs: loss, traffic, steps, verdict."""

import dataclasses

from potluck.cli_nodes import describe_peer_event
from potluck.events import PeerRound

ROUND = PeerRound(
    round=3,
    loss=2.5,
    val_loss=None,
    tokens=3600,
    inner_steps=30,
    stale_steps=0,
    tokens_per_s=1200.0,
    accepted=True,
    reason="",
    update="ab" * 8,
    bytes_up=40_000,
    state_bytes_served=0,
    bytes_down=90_000,
    compute_s=3.0,
    encode_s=0.1,
    upload_s=0.2,
    wait_s=0.5,
    download_s=0.1,
    points=120.0,
    receipt_s=0.0,
    overlap=False,
    overlap_limit=1.0,
    shards=1,
)


def test_a_round_line_counts_the_steps_taken_before_the_rounds_base_arrived_only_when_there_are_any() -> None:
    plain = describe_peer_event(ROUND)
    overlapped = describe_peer_event(dataclasses.replace(ROUND, overlap=True, stale_steps=12))

    assert plain is not None and overlapped is not None
    assert "30 steps in 3.0 s, network 0.8 s |" in plain and "stale" not in plain
    assert "30 steps (12 stale) in 3.0 s, network 0.8 s (overlapped) |" in overlapped
    assert plain.startswith("round    3 | loss 2.500 |") and plain.endswith("accepted, +120 points")
