"""Realistic aggregator and peer events for the web tests, shaped like the ones the nodes emit."""

from typing import Any

AGGREGATOR = "pl-aggr-aaaa-bbbb-cccc"
ALICE = "pl-alic-e222-3333-4444"
BOB = "pl-bobb-5555-6666-7777"
MALLORY = "pl-mall-ory2-3456-7abc"
KEYS = {ALICE: "a1" * 32, BOB: "b2" * 32, MALLORY: "c3" * 32}
MADDR = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWExample"
T0_S = 1_700_000_000.0  # the unix time the run's first round opens


def head(round_index: int) -> dict[str, Any]:
    """A ledger chain head after `round_index` closed."""
    return {
        "round": round_index,
        "last_row_id": 2 * (round_index + 1),
        "head_hash": f"{round_index:02d}" * 32,
        "row_count": 2 * (round_index + 1),
        "timestamp_s": T0_S + 60 * (round_index + 1),
        "aggregator_public_key": "ee" * 32,
        "signature": "ff" * 64,
    }


def ready(**overrides: Any) -> dict[str, Any]:
    """The aggregator's first event: a fresh run, ALICE already on the leaderboard from an earlier run."""
    event = {
        "event": "ready",
        "maddrs": [MADDR, "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWExample"],
        "fingerprint": AGGREGATOR,
        "run": "tiny-stdlib",
        "config_hash": "c0" * 32,
        "round": 0,
        "resumed": False,
        "spooled_updates": 0,
        "val_loss": 5.5,
        "num_params": 1_234_567,
        "state_sha256": "5a" * 32,
        "rounds_total": 100,
        "round_deadline_s": 60.0,
        "model": "gpt-tiny",
        "codec": "topk-int8",
        "aggregate_codec": "int8",
        "leaderboard": [{"fingerprint": ALICE, "public_key": KEYS[ALICE], "points": 10.0, "accepted": 2}],
        "ledger_head": None,
    }
    return event | overrides


def round_open(round_index: int, *, deadline_s: float = 60.0) -> dict[str, Any]:
    """Round `round_index` opens a minute after the previous one."""
    return {"event": "round-open", "round": round_index, "deadline_s": deadline_s, "time_s": T0_S + 60 * round_index}


def received(who: str, round_index: int, *, accepted: bool = True, check: str | None = None) -> dict[str, Any]:
    """An upload from `who`, judged on arrival."""
    return {
        "event": "received",
        "fingerprint": who,
        "round": round_index,
        "tokens": 4096,
        "bytes": 50_000,
        "accepted": accepted,
        "check": check,
        "time_s": T0_S + 60 * round_index + 10,
    }


def rejected(
    who: str, round_index: int, *, check: str = "norm", reason: str = "update norm 1e9 over 10x the median"
) -> dict[str, Any]:
    """A rejection of `who`'s update by `check`."""
    return {
        "event": "rejected",
        "fingerprint": who,
        "round": round_index,
        "check": check,
        "reason": reason,
        "update": "ab" * 8,
    }


def closed(
    round_index: int, *, accepted: list[str], val_loss: float, rejected_count: int = 0, round_s: float = 40.0
) -> dict[str, Any]:
    """A round-close event crediting 1 point per 1024 tokens to each accepted peer."""
    return {
        "event": "round",
        "round": round_index,
        "closed_by": "all-reported",
        "val_loss": val_loss,
        "accepted": [
            {"fingerprint": who, "tokens": 4096, "bytes": 50_000, "update": "cd" * 8, "credit": 4.0}
            for who in accepted
        ],
        "rejected": rejected_count,
        "round_s": round_s,
        "aggregation_s": 0.5,
        "aggregate_bytes": 80_000,
        "state_sha256": f"{round_index:02d}" * 32,
        "tokens": 4096 * len(accepted),
        "time_s": T0_S + 60 * round_index + round_s,
        "bytes_in": 100_000 * (round_index + 1),
        "bytes_out": 300_000 * (round_index + 1),
        "ledger_head": head(round_index),
        "credits": [{"fingerprint": who, "public_key": KEYS[who], "credit": 4.0} for who in accepted],
    }


def two_rounds() -> list[dict[str, Any]]:
    """Round 0: ALICE and BOB accepted; round 1: ALICE accepted, MALLORY rejected then banned; round 2 opens."""
    return [
        ready(),
        round_open(0),
        received(ALICE, 0),
        received(BOB, 0),
        closed(0, accepted=[ALICE, BOB], val_loss=5.0),
        round_open(1),
        received(ALICE, 1),
        received(MALLORY, 1, accepted=False, check="norm"),
        rejected(MALLORY, 1),
        {"event": "banned", "fingerprint": MALLORY, "round": 1, "reason": "3 strikes (norm)"},
        closed(1, accepted=[ALICE], val_loss=4.5, rejected_count=1, round_s=50.0),
        round_open(2),
    ]


def peer_events() -> list[dict[str, Any]]:
    """A peer that joins at round 3, has round 3 accepted and round 4 rejected, and earns one receipt."""
    common = {"tokens": 4096, "tokens_per_s": 800.0, "bytes_up": 50_000, "bytes_down": 80_000, "compute_s": 5.0}
    timings = {"upload_s": 1.0, "wait_s": 20.0, "download_s": 2.0}
    return [
        {
            "event": "synced",
            "run": "tiny-stdlib",
            "round": 3,
            "aggregator": AGGREGATOR,
            "fingerprint": ALICE,
            "state_bytes": 9_000_000,
        },
        {
            "event": "round",
            "round": 3,
            "loss": 4.2,
            "accepted": True,
            "reason": "",
            "update": "aa" * 8,
            "state_bytes_served": 3_000_000,  # a running total: chunks given to a joiner during round 3
            **common,
            **timings,
        },
        {
            "event": "receipt",
            "round": 3,
            "accepted": True,
            "tokens_credited": 4096,
            "score": 4.0,
            "reason": "",
            "update": "aa" * 8,
        },
        {
            "event": "round",
            "round": 4,
            "loss": 4.0,
            "accepted": False,
            "reason": "stale: built on round 2",
            "update": "bb" * 8,
            "state_bytes_served": 3_000_000,
            **common,
            **timings,
        },
    ]
