"""The one status line a peer prints per round says what a user needs: loss, traffic, steps, verdict."""

from potluck.cli.status_lines import describe_peer_event

ROUND = {
    "event": "round",
    "round": 3,
    "loss": 2.5,
    "val_loss": None,
    "tokens_per_s": 1200.0,
    "bytes_up": 40_000,
    "bytes_down": 90_000,
    "inner_steps": 30,
    "stale_steps": 0,
    "compute_s": 3.0,
    "upload_s": 0.2,
    "wait_s": 0.5,
    "download_s": 0.1,
    "accepted": True,
    "reason": "",
    "points": 120.0,
    "overlap": False,
}


def test_a_round_line_counts_the_steps_taken_before_the_rounds_base_arrived_only_when_there_are_any() -> None:
    plain = describe_peer_event(ROUND)
    overlapped = describe_peer_event({**ROUND, "overlap": True, "stale_steps": 12})

    assert plain is not None and overlapped is not None
    assert "30 steps in 3.0 s, network 0.8 s |" in plain and "stale" not in plain
    assert "30 steps (12 stale) in 3.0 s, network 0.8 s (overlapped) |" in overlapped
    assert plain.startswith("round    3 | loss 2.500 |") and plain.endswith("accepted, +120 points")
